"""The `kimi-engine` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .checkpoint import Slot, check_checkpoint
from .config import ModelConfig
from .errors import CheckpointError


def _human(n: float, unit: str = "B") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


def parameter_counts(config: ModelConfig, slots: dict[str, Slot]) -> tuple[int, int]:
    """(total, active per token) parameters; an INT4 weight counts as out x in parameters.

    Active: everything but the routed experts, plus num_experts_per_tok of each layer's experts.
    """
    total = routed = 0
    for key, slot in slots.items():
        if slot.kind in ("scale", "shape"):
            continue
        n = slot.shape[0] * slot.shape[1] * 8 if slot.kind == "packed" else _numel(slot.shape)
        total += n
        routed += n if ".experts." in key else 0
    active = total - routed
    if config.n_routed_experts:
        active += routed * config.num_experts_per_tok // config.n_routed_experts
    return total, active


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect(path: Path) -> int:
    try:
        config, _, slots, infos = check_checkpoint(path)
    except CheckpointError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    c = config
    shards = sorted({info.file.name for info in infos.values()})
    routed = sum(i.nbytes for k, i in infos.items() if ".experts." in k)
    int4 = sum(i.nbytes for k, i in infos.items() if k.endswith(("weight_packed", "weight_scale", "weight_shape")))
    total, active = parameter_counts(config, slots)
    kv_per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 2  # bf16 latent cache
    quant = (f"INT{c.quant.num_bits} group {c.quant.group_size} (compressed-tensors pack-quantized)"
             if c.quant else "none (all bf16)")
    print(f"checkpoint      {path}")
    print(f"architecture    {', '.join(c.architectures)} ({c.model_type}): {c.num_hidden_layers} layers "
          f"({c.first_k_dense_replace} dense), hidden {c.hidden_size}, vocab {c.vocab_size}")
    print(f"attention       MLA, {c.num_attention_heads} heads, q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, "
          f"head dims nope {c.qk_nope_head_dim} + rope {c.qk_rope_head_dim}, v {c.v_head_dim}")
    print(f"experts         {c.n_routed_experts} routed (top-{c.num_experts_per_tok}, {c.n_group} groups, "
          f"top-{c.topk_group} groups) + {c.n_shared_experts} shared, intermediate {c.moe_intermediate_size}")
    rs = c.rope_scaling
    print(f"rope            theta {c.rope_theta:g}" + (f", YaRN x{rs['factor']:g} from {rs['original_max_position_embeddings']}"
                                                        if rs else "") + f", max positions {c.max_position_embeddings:,}")
    print(f"quantization    {quant}")
    print(f"shards          {len(shards)} files, {len(infos):,} tensors")
    print(f"bytes           {_human(sum(i.nbytes for i in infos.values()))} total: INT4 {_human(int4)} "
          f"(routed experts {_human(routed)}), bf16/other {_human(sum(i.nbytes for i in infos.values()) - int4)}")
    print(f"parameters      {_human(total, '')} total, {_human(active, '')} active per token")
    print(f"kv cache (bf16) {kv_per_token:,} bytes per token, {_human(kv_per_token * c.max_position_embeddings)} "
          f"per {c.max_position_embeddings:,}-token sequence")
    print("valid           yes: every tensor present, shapes, dtypes and weight_shape checked")
    return 0


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _load(args, **kwargs):
    """The engine the arguments describe. Under torchrun (WORLD_SIZE > 1) each rank loads its shard of a
    tensor/expert-parallel model; every rank then runs the same command, and only rank 0 prints."""
    import torch

    from .runtime.engine import load
    parallel = None
    if _under_torchrun():
        from .parallel import Parallel
        parallel = Parallel.from_env()
        if parallel.rank != 0:
            sys.stdout = open(os.devnull, "w")   # every rank computes the same tokens; one prints them
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if parallel is not None and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    dtype = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    progress = args.model is not None and (parallel is None or parallel.rank == 0)
    return load(args.model, device=device, dtype=dtype, progress=progress, parallel=parallel,
                threads=getattr(args, "threads", None), **kwargs)


def bench(args) -> int:
    """Prefill tokens/s and decode ms per step of this checkpoint on this machine (random token ids)."""
    import torch

    engine = _load(args, max_batch_size=max(args.batches), cuda_graphs=args.cuda_graphs,
                   max_seq_len=max(args.prompts + [args.context + args.steps + 2]))
    cuda = engine.device.type == "cuda"
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(2, engine.config.vocab_size, (n,), generator=gen).tolist()

    def timed(fn, reps: int) -> float:
        """Seconds per call, after one warm-up call (compiles, captures, allocator growth)."""
        fn()
        if cuda:
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize(engine.device)
        return (time.perf_counter() - start) / reps

    def prefill(prompt):
        cache = engine.new_cache()
        engine.prefill(cache, cache.add_sequence(), prompt)
    print(f"{engine.device}, {engine.dtype}, {engine.config.num_hidden_layers} layers, "
          f"CUDA graphs {'on' if engine.graphs is not None and cuda else 'off'}")
    print("| prefill tokens | ms | tokens/s |\n|---:|---:|---:|")
    for n in args.prompts:
        prompt = ids(n)
        sec = timed(lambda: prefill(prompt), args.reps)
        print(f"| {n:,} | {sec * 1e3:,.1f} | {n / sec:,.0f} |")
    print(f"\n| batch | context | ms per decode step | tokens/s |\n|---:|---:|---:|---:|")
    blocks = engine.blocks             # the engine's own cache, so that decode runs through its CUDA graphs
    for batch in args.batches:
        seqs = [blocks.add_sequence() for _ in range(batch)]
        for seq in seqs:
            engine.prefill(blocks, seq, ids(args.context))
        tokens = ids(batch)
        sec = timed(lambda: engine.runner.decode(tokens, blocks.prepare(seqs, 1, device="cpu")), args.steps)
        print(f"| {batch} | {args.context:,} | {sec * 1e3:,.2f} | {batch / sec:,.1f} |")
        for seq in seqs:
            blocks.free(seq)
    return 0


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


def generate(args) -> int:
    engine = _load(args)
    start = first = time.perf_counter()
    completion_tokens = 0
    for delta in engine.generate(args.prompt, stream=True, **_sampling(args)):
        if completion_tokens == 0:
            first = time.perf_counter()
        completion_tokens += len(delta.token_ids)
        print(delta.text, end="", flush=True)
    end = time.perf_counter()
    print()
    if args.stats:
        prompt_tokens = len(engine.tokenizer.encode(args.prompt))
        decode = (completion_tokens - 1) / (end - first) if completion_tokens > 1 and end > first else float("nan")
        print(f"[prefill {prompt_tokens} tokens: {prompt_tokens / (first - start):,.1f} tok/s | decode "
              f"{completion_tokens - 1} tokens: {decode:,.1f} tok/s | {engine.device}, {engine.dtype}]",
              file=sys.stderr)
    return 0


def chat(args) -> int:
    engine = _load(args)
    messages: list[dict] = []
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print("kimi-engine chat: an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = {"role": "assistant", "content": "", "reasoning_content": ""}
        section = None
        for delta in engine.chat(messages, thinking=not args.no_thinking, stream=True, **_sampling(args)):
            for key, label in (("reasoning_content", f"{dim}thinking> "), ("content", f"{reset}kimi> ")):
                if key in delta:
                    if section != key:
                        print(("\n" if section else "") + label, end="")
                        section = key
                    print(delta[key], end="", flush=True)
                    reply[key] += delta[key]
        print(reset)
        messages.append(reply)
    return 0


# On a CPU float32 decodes about as fast as bf16 and prefills ~0.6x as fast (benchmarks/bench_cpu.py).
DTYPE_HELP = "auto: bfloat16, the checkpoint's own dtype, on CUDA and on CPU alike"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def positive_ints(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8], each >= 1."""
    return [positive_int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-engine", description="Run Kimi K2 Thinking from Python. "
                                     "Under torchrun (python -m kimi_engine.cli ...) generate and chat run tensor/expert parallel.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarize and validate a checkpoint directory (reads headers only)")
    p.add_argument("path", type=Path)
    p = sub.add_parser("plan", help="per-GPU memory and the batch-1 decode floor of a model split over GPUs")
    p.add_argument("--config", type=Path, required=True, help="config.json (or a checkpoint directory)")
    p.add_argument("--world-size", type=int, default=8, help="GPUs the model is split over")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GB (10^9 bytes)")
    p.add_argument("--context", type=positive_int, required=True, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the KV cache")
    p.add_argument("--kv-fp8", action="store_true", help="an fp8 latent cache")
    p = sub.add_parser("quantize", help="write a bf16 checkpoint's routed experts as INT4, Kimi K2 Thinking's layout")
    p.add_argument("src", type=Path, help="a bf16 checkpoint directory of this architecture")
    p.add_argument("dst", type=Path, help="the new directory (must not exist)")
    p.add_argument("--group-size", type=int, default=32, help="inputs per scale (Kimi K2 Thinking: 32)")
    p.add_argument("--device", default="cpu", help="where to quantize (cuda is faster; the result is the same)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard, GiB")
    for name, help_text in (("generate", "stream a completion of PROMPT to stdout"),
                            ("chat", "an interactive chat that shows the reasoning apart from the answer"),
                            ("bench", "prefill tokens/s and decode ms per step of a checkpoint on this machine")):
        p = sub.add_parser(name, help=help_text)
        if name == "generate":
            p.add_argument("prompt")
            p.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s to stderr")
        elif name == "chat":
            p.add_argument("--no-thinking", action="store_true", help="answer without a reasoning block")
        else:
            p.add_argument("--prompts", type=positive_ints, default=[128, 1024], help="prefill lengths, e.g. 128,1024")
            p.add_argument("--batches", type=positive_ints, default=[1, 4, 8], help="decode batch sizes, e.g. 1,4,8")
            p.add_argument("--context", type=positive_int, default=512, help="cached tokens per sequence while decoding")
            p.add_argument("--steps", type=positive_int, default=16, help="timed decode steps per batch size")
            p.add_argument("--reps", type=positive_int, default=3, help="timed prefills per length")
            p.add_argument("--cuda-graphs", action="store_true", help="decode through CUDA graphs (CUDA only)")
        p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in demo)")
        if name != "bench":
            p.add_argument("--max-new-tokens", type=int, default=None,
                           help="default: generation_config.json's, else 256 (generate) / 4,096 (chat)")
            # None: the checkpoint's generation_config.json (the demo's: temperature 1.0, top-p 0.95)
            p.add_argument("--temperature", type=float, default=None)
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--seed", type=int, default=None)
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        p.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads (default: the CPUs this process may run on)")
        p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                       help=DTYPE_HELP)
    # serve: an OpenAI-compatible server (kimi_engine/server); its flags live beside it.
    from .server.main import add_arguments as add_serve_arguments
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: chat, completions, tools, metrics")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in demo)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help=DTYPE_HELP)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: the CPUs this process may run on)")
    add_serve_arguments(p)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from .server.main import serve
            return serve(args, lambda **kwargs: _load(args, **kwargs))
        if args.command == "generate":
            return generate(args)
        if args.command == "chat":
            return chat(args)
        if args.command == "bench":
            return bench(args)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "inspect":
        return inspect(args.path)
    if args.command == "quantize":
        from .quantize import quantize_checkpoint
        try:
            out = quantize_checkpoint(args.src, args.dst, args.group_size, args.device, int(args.max_shard_gb * 2**30))
        except (ValueError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
        return inspect(out)
    if args.command == "plan":
        from .plan import format_plan, plan
        try:
            config = ModelConfig.from_json(args.config)
            print(format_plan(plan(config, args.world_size, args.gpu_memory, args.context, args.batch, args.kv_fp8)))
        except ValueError as e:   # CheckpointError too
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
