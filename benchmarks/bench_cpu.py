"""CPU decode and prefill against the memory-bandwidth floor, beside llama.cpp and HF transformers
on the same weights.

    python benchmarks/bench_cpu.py [--dir DIR] [--threads N] [--rounds 5] [--decode 32] [--prompt 128]
                                   [--engines kimi-bf16,kimi-fp32,llama-q4exp,llama-q4[,hf-bf16]]

The model: 6 DeepSeek-V3-architecture layers in Kimi K2 Thinking's format (hidden 2048, 16 heads,
64 INT4 experts of 1024 with top-8, one shared expert, a dense first layer, vocab 32000): ~1.66 GB,
written once into DIR by the library's streaming writer and reused. The bandwidth floor is the
bytes a batch-1 decode step must read (every bf16 matrix but the embedding, the 8 touched experts
of each MoE layer, the latent cache at the rounds' mean context) over the machine's read
bandwidth (a multi-threaded sum over 512 MB in 2 MB pages, like the weights): at the best read of
the run, what the memory system can deliver, and paired, at the read taken just before each
engine's round, what it delivered then (on a shared VM the two have differed by 1.7x: 53 against
32 GB/s). A long --prompt (say 4096) measures decode where attention, not the weights, sets the pace.
Engines run round by round (each engine once per round) so that a busy machine slows all of them
alike; the table gives medians over rounds and the min-max range. Peers (`pip install -e .[peers]`:
llama-cpp-python, gguf, transformers) are skipped with a message when absent.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import kimi_engine  # noqa: E402
from kimi_engine import cpu_step, ops  # noqa: E402
from kimi_engine.checkpoint import read_headers  # noqa: E402
from kimi_engine.config import ModelConfig  # noqa: E402
from kimi_engine.kernels import cpu  # noqa: E402
from kimi_engine.synthetic import kimi_k2_config, write_random_checkpoint  # noqa: E402

ENGINES = ("kimi-bf16", "kimi-fp32", "llama-q4exp", "llama-q4", "hf-bf16")
# HF holds the experts dequantized (~4 GB more here, ~14 GB resident with every engine loaded): opt in.
DEFAULT_ENGINES = ENGINES[:4]
SAME_BITS = "llama-q4exp"   # the peer that reads the same bits: the tables' ratios are to it
SEED = 0


def bench_config() -> ModelConfig:
    d = kimi_k2_config(6).to_dict()
    d.update(hidden_size=2048, intermediate_size=2048, moe_intermediate_size=1024, num_attention_heads=16,
             num_key_value_heads=16, n_routed_experts=64, vocab_size=32000, max_position_embeddings=16384)
    return ModelConfig.from_dict(d)


def checkpoint(root: Path, config: ModelConfig) -> Path:
    path = root / "ckpt"
    if (path / "config.json").exists() and ModelConfig.from_json(path / "config.json").to_dict() == config.to_dict():
        return path
    print(f"writing the benchmark checkpoint to {path} (streaming; a few minutes)")
    return write_random_checkpoint(path, config, seed=SEED, max_shard_bytes=512 << 20, progress=True)


def decode_bytes(path: Path, config: ModelConfig, context: int = 0) -> int:
    """Bytes a batch-1 decode step reads: all tensors but the embedding table (one row) and the
    untouched experts (top_k of n_routed_experts per MoE layer), and the bf16 latent cache of
    `context` tokens in every layer."""
    total = config.num_hidden_layers * context * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    for key, info in read_headers(path).items():
        n = info.nbytes
        if key.endswith("embed_tokens.weight"):
            n = n // config.vocab_size
        elif ".experts." in key and not key.endswith("weight_shape"):
            n = n * config.num_experts_per_tok / config.n_routed_experts
        total += n
    return int(total)


def prefill_flop(path: Path, config: ModelConfig, tokens: int) -> float:
    """Floating-point operations of prefilling `tokens` prompt tokens: 2 per weight a token meets
    (every matrix but the embedding; top_k of n_routed_experts experts per MoE layer), lm_head once
    (for the last token, as the engines do), and causal attention over the prompt."""
    per_token = lm_head = 0.0
    for key, info in read_headers(path).items():
        if len(info.shape) != 2 or key.endswith(("embed_tokens.weight", "weight_scale")):
            continue
        n = info.shape[0] * info.shape[1]
        if key.endswith("weight_packed"):   # int32 words of 8 INT4 weights
            n = n * 8 * config.num_experts_per_tok / config.n_routed_experts
        if key == "lm_head.weight":
            lm_head = n
        else:
            per_token += n
    c = config
    attention = c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    return 2 * (tokens * per_token + lm_head + attention * tokens * (tokens + 1) / 2)


def gemm_rate(threads: int, rows: int, dtype: torch.dtype, reps: int = 9) -> float:
    """Best GFLOP/s of torch's own GEMM (oneDNN) at a prefill's shape: [rows, 2048] x [2048, 2048]."""
    torch.set_num_threads(threads)
    x, w = torch.randn(rows, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(x, w)
        best = max(best, 4 * 2 * rows * 2048 * 2048 / (time.perf_counter() - t) / 1e9)
    return best


class ReadProbe:
    """The machine's read bandwidth: a multi-threaded float32 sum over 512 MB held in the weights' kind
    of memory (cpu.empty_weight: 2 MB pages, ~10% faster to stream here than 4 KB ones)."""

    def __init__(self, threads: int, nbytes: int = 512 << 20):
        self.threads, self.nbytes = threads, nbytes
        self.x = cpu.empty_weight((nbytes // 4,), torch.float32).uniform_()

    def read(self, reps: int) -> list[float]:
        """GB/s of each of reps sums."""
        torch.set_num_threads(self.threads)
        self.x.sum()
        rates = []
        for _ in range(reps):
            t = time.perf_counter()
            self.x.sum()
            rates.append(self.nbytes / (time.perf_counter() - t) / 1e9)
        return rates


# ------------------------------------------------------------------------------------------ engines
class Kimi:
    def __init__(self, path: Path, dtype: torch.dtype, threads: int):
        self.threads = threads
        ops.set_threads(threads)
        # No prefix cache: every round prefills the whole prompt, as llama.cpp's does after reset().
        self.engine = kimi_engine.load(path, dtype=dtype, device="cpu", progress=False, prefix_cache=False)
        self.phases: dict[str, list[float]] = {}   # per round: ms per decode step in each of cpu_step.PHASES

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        """(prefill seconds for the prompt, median seconds per decoded token)."""
        ops.set_threads(self.threads)
        start, stamps = time.perf_counter(), []
        stream = self.engine.generate(prompt, max_new_tokens=n + 1, temperature=0.0, stream=True)
        next(stream)   # the prompt's step
        stamps.append(time.perf_counter())
        with cpu_step.phase_timings() as seconds:
            for _ in stream:
                stamps.append(time.perf_counter())
        for phase, s in seconds.items():
            self.phases.setdefault(phase, []).append(s / n * 1e3)
        return stamps[0] - start, statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, n_ctx: int, n_batch: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=n_batch, n_ubatch=n_batch, verbose=False)

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - start
        gaps = []
        for i in range(n):   # the logits are computed each step; which token is fed does not change the work
            t = time.perf_counter()
            self.llm.eval([(prompt[-1] * 31 + i * 17) % 31000 + 500])
            gaps.append(time.perf_counter() - t)
        return prefill, statistics.median(gaps)


class HF:
    def __init__(self, path: Path, config: ModelConfig, threads: int):
        from hf_cpu import hf_model
        self.threads = threads
        self.model = hf_model(path, config, torch.bfloat16)

    @torch.no_grad()
    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        torch.set_num_threads(self.threads)
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        out = self.model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, tok, gaps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(n):
            t = time.perf_counter()
            out = self.model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            gaps.append(time.perf_counter() - t)
        return prefill, statistics.median(gaps)


def make(name: str, root: Path, path: Path, config: ModelConfig, args):
    """The engine, or a string saying why it is skipped."""
    if name == "kimi-bf16":
        return Kimi(path, torch.bfloat16, args.threads)
    if name == "kimi-fp32":
        return Kimi(path, torch.float32, args.threads)
    if name.startswith("llama"):
        try:
            import gguf  # noqa: F401
            import llama_cpp  # noqa: F401
        except ImportError as e:
            return f"skipped: {e.name} is not installed (pip install -e .[peers])"
        from cpu_gguf import write_gguf
        experts_only = name == "llama-q4exp"
        file = root / ("experts-q4_0-rest-bf16.gguf" if experts_only else "all-q4_0.gguf")
        if not file.exists():
            print(f"converting to {file}")
            write_gguf(path, config, file, experts_only)
        return LlamaCpp(file, args.threads, n_ctx=args.prompt + args.decode + 64, n_batch=args.prompt)
    if name == "hf-bf16":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "skipped: transformers is not installed (pip install -e .[peers])"
        return HF(path, config, args.threads)
    raise ValueError(f"--engines: unknown engine {name!r}; choose from {', '.join(ENGINES)}")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kimi-cpu-bench")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode", type=int, default=32, help="tokens decoded per round (the median step is kept)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens prefilled per round")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    args = p.parse_args(argv)
    for name in ("threads", "rounds", "decode", "prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    args.dir.mkdir(parents=True, exist_ok=True)
    config = bench_config()
    path = checkpoint(args.dir, config)
    step_bytes = decode_bytes(path, config, args.prompt + args.decode // 2)   # at the rounds' mean context
    probe = ReadProbe(args.threads)
    reads = probe.read(9)
    floor_ms = step_bytes / (max(reads) * 1e9) * 1e3
    print(f"{os.cpu_count()} CPUs, {args.threads} threads; read bandwidth {max(reads):.1f} GB/s (best of 9; median "
          f"{statistics.median(reads):.1f}); {step_bytes / 1e6:.0f} MB read per decode token -> floor {floor_ms:.1f} ms "
          f"({1e3 / floor_ms:.1f} tok/s)")
    gemm = {dtype: gemm_rate(args.threads, args.prompt, dtype) for dtype in (torch.bfloat16, torch.float32)}
    flop = prefill_flop(path, config, args.prompt)
    print(f"torch GEMM at the prefill's shape ({args.prompt} x 2048 x 2048): bf16 {gemm[torch.bfloat16]:.0f} GFLOP/s, "
          f"float32 {gemm[torch.float32]:.0f}; prefilling {args.prompt} tokens is "
          f"{flop / 1e9:.1f} GFLOP")

    engines = {}
    for name in args.engines.split(","):
        got = make(name.strip(), args.dir, path, config, args)
        if isinstance(got, str):
            print(f"{name}: {got}")
        else:
            got.run(list(range(500, 508)), 2)   # warm-up: first-call conversions, page faults of mmapped weights
            engines[name.strip()] = got
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(500, config.vocab_size - 500, (args.prompt,), generator=g).tolist()
    # Per engine and round: (prefill seconds, seconds per decoded token, GB/s the probe read just before).
    results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in engines}
    for r in range(args.rounds):
        for name, engine in engines.items():
            now = probe.read(3)   # what the memory system gives at this moment, for this engine's round
            reads += now
            results[name].append((*engine.run(prompt, args.decode), max(now)))
            gc.collect()
        print(f"round {r + 1}: " + ", ".join(f"{n} {1 / v[-1][1]:.1f} (read {v[-1][2]:.0f} GB/s)"
                                             for n, v in results.items()) + " tok/s")
    report(results, args, step_bytes, max(reads))
    report_prefill(results, args, flop, gemm[torch.bfloat16])
    report_phases({n: e for n, e in engines.items() if isinstance(e, Kimi)})


def report(results, args, step_bytes: int, best_read: float) -> None:
    """Decode against the floor (the step's bytes over the read bandwidth) at the best read of the
    whole run, what the memory system can deliver, and at the read just before each round, what it
    delivered then: a shared VM's bandwidth moves by 1.5x within minutes, every engine's with it."""
    def med(v):
        return statistics.median(v)
    decode = {n: [1 / s for _, s, _ in v] for n, v in results.items()}
    paired = {n: [step_bytes / s / (read * 1e9) for _, s, read in v] for n, v in results.items()}
    base = SAME_BITS if SAME_BITS in results else None
    floor_ms = step_bytes / (best_read * 1e9) * 1e3
    print(f"\n| engine ({args.threads} threads) | decode tok/s median (range) | ms/token | GB/s "
          f"| % of floor: best read / paired read (range) | vs llama.cpp same bits |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in results:
        d, p = med(decode[n]), paired[n]
        ratio = f"{d / med(decode[base]):.2f}x" if base else "-"
        print(f"| {n} | {d:.1f} ({min(decode[n]):.1f}-{max(decode[n]):.1f}) | {1e3 / d:.1f} | "
              f"{step_bytes * d / 1e9:.1f} | {100 * floor_ms * d / 1e3:.0f}% / {100 * med(p):.0f}% "
              f"({100 * min(p):.0f}-{100 * max(p):.0f}%) | {ratio} |")
    print(f"\nfloor: {step_bytes / 1e6:.0f} MB/token at {best_read:.1f} GB/s (the best read of the run) = "
          f"{floor_ms:.1f} ms; paired: each round's GB/s over the best of 3 reads just before it (median over "
          f"rounds); llama.cpp decodes fed token ids (its logits computed every step), kimi-engine greedy.")


def report_prefill(results, args, flop: float, gemm_bf16: float) -> None:
    """Prefill against the machine's FLOP/s: torch's bf16 GEMM at the same row count is the roofline
    a CPU prefill can reach here (AVX512-BF16 through oneDNN)."""
    prefill = {n: [args.prompt / p for p, _, _ in v] for n, v in results.items()}
    base = SAME_BITS if SAME_BITS in results else None
    print(f"\n| engine | prefill tok/s ({args.prompt} tokens) median (range) | GFLOP/s | % of torch bf16 GEMM "
          f"({gemm_bf16:.0f} GFLOP/s) | vs llama.cpp same bits |")
    print("|---|---:|---:|---:|---:|")
    for n, v in prefill.items():
        pf = statistics.median(v)
        rate = flop * pf / args.prompt / 1e9
        ratio = f"{pf / statistics.median(prefill[base]):.2f}x" if base else "-"
        print(f"| {n} | {pf:.0f} ({min(v):.0f}-{max(v):.0f}) | {rate:.0f} | {100 * rate / gemm_bf16:.0f}% | {ratio} |")


def report_phases(kimis: dict[str, Kimi]) -> None:
    """Where kimi-engine's decode step goes (kt_decode_step's own clock; medians over rounds)."""
    kimis = {n: e for n, e in kimis.items() if sum(map(sum, e.phases.values())) > 0}   # the step kernel ran
    if not kimis:
        return
    print("\n| ms per decode step | " + " | ".join(kimis) + " |")
    print("|---|" + "---:|" * len(kimis))
    for phase in cpu_step.PHASES:
        print(f"| {phase} | " + " | ".join(f"{statistics.median(e.phases[phase]):.2f}" for e in kimis.values()) + " |")
    print("| total in the step kernel | " + " | ".join(
        f"{sum(statistics.median(e.phases[p]) for p in cpu_step.PHASES):.2f}" for e in kimis.values()) + " |")


if __name__ == "__main__":
    main()
