"""Train the built-in demo model: a small Kimi K2 (DeepSeek-V3 architecture) model on tiny Shakespeare.

    python scripts/train_demo.py                       # the shipped run: writes kimi_engine/demo/ (~20 min, 2 CPU cores)
    python scripts/train_demo.py --steps 50 --out /tmp/demo   # a quick try

Everything the engine runs is here at small scale: MLA with q_lora and kv_lora ranks, YaRN rope with
Kimi's settings (beta_fast = beta_slow = 1, the degenerate ramp), a dense first layer, then MoE layers
with 16 routed experts (top-2, one shared expert) behind the noaux_tc sigmoid router. The router's
e_score_correction_bias is trained the aux-loss-free way (DeepSeek-V3, section 2.1.2): after every step
each expert's bias rises by `gamma` if it received fewer than the mean number of tokens, falls if more.

Data: ../shared/data/tinyshakespeare.txt; the last 10% (from a line start) is held out. The tokenizer is
a byte-level BPE trained with `tokenizers` on the training part, written in Kimi's format (tiktoken.model,
tokenizer_config.json with Kimi's special tokens after the base vocabulary) with Kimi K2 Thinking's
chat template. A quarter of the training windows are Shakespeare dialogues rendered through that
template (one speech as the user turn, the next as the assistant's reply after a one-line reasoning,
"<think>JULIET answers ROMEO.</think>JULIET:\n..."), trained on the replies only, so `kimi-engine chat`
gets replies that end at <|im_end|>, and plain text never drifts into chat markup.

Training is float32 on the CPU (bf16 autocast is much slower on CPUs without AVX512-BF16/AMX). The
trained weights are rounded to bf16 and written with save_checkpoint under Kimi's quantization config,
so the routed experts become INT4 (g32) and everything else stays bf16. The script then loads what it
wrote through kimi_engine.load and reports held-out loss and perplexity of the bf16 and the INT4 model,
a unigram baseline, the load across experts and the decode speed, and records them in metrics.json
(tests/test_demo.py checks the shipped model against it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kimi_engine
from kimi_engine.chat import THINK_BEGIN, THINK_END, builtin_chat_template
from kimi_engine.checkpoint import checkpoint_state_dict, save_checkpoint
from kimi_engine.config import KIMI_QUANT, ModelConfig
from kimi_engine.model import Gate, Transformer
from kimi_engine.chat.tokenizer import Tokenizer, train_bpe, write_kimi_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BASE_VOCAB = 3840          # + Kimi's 256 reserved special ids = 4096
CONTEXT = 256              # training window; YaRN's original_max_position_embeddings
TEST_SLICE_CHARS = 2000    # the held-out prefix tests/test_demo.py scores
IGNORE = -100              # cross_entropy's ignore_index: dialogue tokens that are context, not targets
RECOMMENDED_SAMPLING = {"temperature": 1.0, "top_p": 0.95}   # generation_config.json (see generation_config)


def demo_config(vocab_size: int, bos: int, eos: int, pad: int) -> ModelConfig:
    """Kimi K2 Thinking's config.json, scaled down; hidden and expert sizes are multiples of 32 (INT4 g32)."""
    return ModelConfig.from_dict(dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.827, scoring_func="sigmoid", topk_method="noaux_tc",
        rope_theta=50000.0, max_position_embeddings=4 * CONTEXT,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=CONTEXT,
                          beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        model_type="kimi_k2", torch_dtype="bfloat16",
    ))


# ------------------------------------------------------------------------------------------ data
def split_text(text: str) -> tuple[str, str]:
    """(train, held out): the held-out part is the last 10%, starting at a line."""
    cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1
    return text[:cut], text[cut:]


def dialogues(text: str, tokenizer: Tokenizer, rng: random.Random) -> list[tuple[str, str]]:
    """Consecutive speeches as chat turns: (prompt, completion) pairs, the prompt rendered with the
    checkpoint's chat template up to the generation prompt, the completion what the model should write.

    Conversations of one or two exchanges; the user's speaker name is dropped half the time (people
    typing into `kimi-engine chat` give none). The completion reasons in one line first. It is written
    out here rather than rendered: Kimi's template drops the reasoning of finished assistant turns.
    """
    speeches = [m.groups() for m in re.finditer(r"^([A-Z][A-Za-z' ]*):\n(.+?)(?=\n\n|\Z)", text, re.M | re.S)]
    out, i = [], 0
    while i + 1 < len(speeches):
        n = rng.choice((2, 4)) if i + 3 < len(speeches) else 2
        messages, named = [], False
        for j, (name, speech) in enumerate(speeches[i:i + n]):
            if j % 2 == 0:
                named = rng.random() < 0.5
                messages.append({"role": "user", "content": f"{name}:\n{speech}" if named else speech})
            else:
                messages.append({"role": "assistant", "content": f"{name}:\n{speech}"})
        (speaker, _), (other, _) = speeches[i + n - 1], speeches[i + n - 2]
        reasoning = f"{speaker} answers {other}." if named and speaker != other else f"{speaker} answers."
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        out.append((prompt, f"{THINK_BEGIN}{reasoning}{THINK_END}{messages[-1]['content']}{tokenizer.eos_token}"))
        i += n
    return out


def encode_dialogues(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """One token stream of all the dialogues, and which tokens are trained on (the completions only:
    the system prompt and the user turns are context, never targets)."""
    ids, trained = [], []
    for prompt, completion in pairs:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
        ids += p + c
        trained += [False] * len(p) + [True] * len(c)
    return torch.tensor(ids), torch.tensor(trained)


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping scoring windows [N, length + 1]: each token after the first is predicted exactly once."""
    n = (ids.numel() - 1) // length
    return torch.stack([ids[i * length: i * length + length + 1] for i in range(n)])


# ------------------------------------------------------------------------------------------ model
def init_model(config: ModelConfig, seed: int) -> Transformer:
    """A trainable float32 model: GPT-2 style init (std 0.02, residual projections / sqrt(2 layers)),
    norms 1, router bias 0. The bias is not a gradient parameter: the balance rule moves it."""
    model = Transformer(config)
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_weight")):
                p.normal_(0.0, residual_std, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
        p.requires_grad_(not name.endswith("e_score_correction_bias"))
    return model


class LoadCounter:
    """Tokens routed to each expert of each MoE layer, from forward hooks on the routers."""

    def __init__(self, model: Transformer):
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.counts = torch.zeros(len(self.gates), model.config.n_routed_experts)
        self.hooks = [gate.register_forward_hook(lambda _m, _in, out, i=i: self._add(i, out[1]))
                      for i, gate in enumerate(self.gates)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _add(self, layer: int, ids: torch.Tensor) -> None:
        self.counts[layer] += torch.bincount(ids.flatten().long(), minlength=self.counts.shape[1]).float()

    def take(self) -> torch.Tensor:
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        return counts

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, gamma: float) -> None:
        """DeepSeek-V3's aux-loss-free balancing: under-loaded experts up by gamma, over-loaded down."""
        for gate, load in zip(self.gates, counts):
            gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


@torch.no_grad()
def mean_loss(model: Transformer, wins: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over windows [N, S + 1], each scored from position 0."""
    total, count = 0.0, 0
    for chunk in wins.split(batch):
        logits = model(chunk[:, :-1].to(model.rope_cos.device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of the held-out tokens under the training tokens' add-one-smoothed frequencies."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[val_ids[1:]].mean().item()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))   # cosine down to 10%


def train(model: Transformer, text_ids: torch.Tensor, chat_ids: torch.Tensor, chat_trained: torch.Tensor,
          val: torch.Tensor, args: argparse.Namespace) -> dict:
    """AdamW on random windows (a quarter from the dialogues, trained on their completions only);
    returns the best-validation state and a log."""
    g = torch.Generator().manual_seed(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    counter = LoadCounter(model)
    n_chat = args.batch // 4
    best = {"val_loss": float("inf")}
    history, ema, t0 = [], None, time.perf_counter()
    for step in range(args.steps):
        starts_t = torch.randint(0, text_ids.numel() - CONTEXT - 1, (args.batch - n_chat,), generator=g)
        starts_c = torch.randint(0, chat_ids.numel() - CONTEXT - 1, (n_chat,), generator=g)
        x = torch.stack([text_ids[s:s + CONTEXT + 1] for s in starts_t] + [chat_ids[s:s + CONTEXT + 1] for s in starts_c])
        y = x[:, 1:].clone()
        y[len(starts_t):][~torch.stack([chat_trained[s + 1:s + CONTEXT + 1] for s in starts_c])] = IGNORE
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        model.train()
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        counts = counter.take()
        counter.update_bias(counts, args.gamma)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            val_loss = mean_loss(model, val)
            counter.take()   # evaluation routes tokens too; they are not training load
            max_vio = ((counts.max(1).values - counts.mean(1)) / counts.mean(1)).max().item()
            elapsed = time.perf_counter() - t0
            history.append(dict(step=step + 1, train_loss=round(ema, 4), val_loss=round(val_loss, 4),
                                max_vio=round(max_vio, 3), minutes=round(elapsed / 60, 2)))
            print(f"step {step + 1:5d}  train {ema:.3f}  val {val_loss:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"MaxVio {max_vio:.2f}  {elapsed / 60:5.1f} min", flush=True)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return dict(best=best, history=history, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ export
def export(model: Transformer, out: Path, bf16_dir: Path) -> ModelConfig:
    """Round to bf16 (the router bias stays float32, as in K2-Instruct) and write two checkpoints:
    the shipped one (routed experts INT4 g32 under Kimi's quantization config) and an all-bf16 one."""
    state = {k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16))
             for k, v in checkpoint_state_dict(model).items()}
    save_checkpoint(state, bf16_dir, model.config)
    quant_config = model.config.replace(quantization_config=KIMI_QUANT.to_dict())
    for stale in out.glob("model-*.safetensors"):
        stale.unlink()
    save_checkpoint(state, out, quant_config)
    (out / "generation_config.json").write_text(json.dumps(generation_config(quant_config), indent=2) + "\n")
    return quant_config


def generation_config(config: ModelConfig) -> dict:
    """generation_config.json: the token ids, the context, and the sampling defaults the engine reads
    (kimi_engine.config.read_generation_config). Temperature 1.0 and top_p 0.95 are what Moonshot
    recommends for K2 Thinking, and they fit this model too: its held-out loss is lowest at temperature
    ~1.0 (measured over 10k held-out tokens: 4.61 at 0.8, 4.43 at 1.0, 4.43 at 1.1, 4.48 at 1.2), and the
    top 0.95 of its probability mass holds 94% of the held-out next tokens (calibrated), so the cut
    removes the long tail of unlikely tokens without the repetition of greedy decoding."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "max_length": config.max_position_embeddings, **RECOMMENDED_SAMPLING}


def expert_loads(engine, wins: torch.Tensor) -> torch.Tensor:
    """Share of routed (token, slot) pairs each expert of each MoE layer receives over `wins` [layers, E]."""
    counter = LoadCounter(engine.model)
    mean_loss(engine.model, wins)
    counter.remove()
    counts = counter.take()
    return counts / counts.sum(1, keepdim=True)


def decode_speed(engine, prompt: str, tokens: int) -> tuple[float, str]:
    """Greedy decode tokens/s (prefill excluded: a warm-up call, then time a long and a 1-token run)."""
    ids = engine.tokenizer.encode(prompt)
    engine.greedy(ids, 4)
    t = time.perf_counter()
    engine.greedy(ids, 1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = engine.greedy(ids, tokens)
    seconds = time.perf_counter() - t - prefill
    return (len(out) - 1) / seconds, engine.tokenizer.decode(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "kimi_engine" / "demo")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--gamma", type=float, default=1e-2,
                    help="router bias update per step (DeepSeek-V3: 0.001 over ~10^5x more steps; at 0.001 this "
                         "short run ends with an expert taking 6x its share)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    text = args.data.read_text(encoding="utf-8")
    train_text, val_text = split_text(text)
    t = time.perf_counter()
    tokens = train_bpe(train_text.split("\n\n"), BASE_VOCAB)   # paragraphs: no merge spans a blank line
    args.out.mkdir(parents=True, exist_ok=True)
    write_kimi_tokenizer(args.out, tokens, chat_template=builtin_chat_template(),
                         model_max_length=4 * CONTEXT)
    tokenizer = Tokenizer.from_pretrained(args.out)
    encode = lambda s: torch.tensor(tokenizer.encode(s), dtype=torch.long)  # noqa: E731
    text_ids, val_ids = encode(train_text), encode(val_text)
    chat_ids, chat_trained = encode_dialogues(dialogues(train_text, tokenizer, random.Random(args.seed)), tokenizer)
    print(f"tokenizer: {len(tokens)} base + {len(tokenizer.special_tokens)} special ids; "
          f"train {text_ids.numel():,} tokens ({len(train_text) / text_ids.numel():.2f} chars/token), "
          f"dialogues {chat_ids.numel():,} ({int(chat_trained.sum()):,} trained), held out {val_ids.numel():,} ({time.perf_counter() - t:.0f} s)", flush=True)

    config = demo_config(tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.special_tokens["[PAD]"])
    model = init_model(config, args.seed)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{args.steps} steps x {args.batch} x {CONTEXT} tokens", flush=True)
    val = windows(val_ids, CONTEXT)
    run = train(model, text_ids, chat_ids, chat_trained, val, args)
    model.load_state_dict(run["best"]["state"])
    model.eval()
    fp32_loss = mean_loss(model, val)

    with tempfile.TemporaryDirectory() as tmp:
        export(model, args.out, Path(tmp) / "bf16")
        bf16 = kimi_engine.load(Path(tmp) / "bf16", device="cpu", dtype=torch.float32, progress=False)
        bf16_loss = mean_loss(bf16.model, val)
    engine = kimi_engine.load(args.out, device="cpu", dtype=torch.float32, progress=False)
    int4_loss = mean_loss(engine.model, val)
    loads = expert_loads(engine, val)
    uni_loss = unigram_loss(text_ids, val_ids, config.vocab_size)

    # The slice tests/test_demo.py scores: the held-out text's first lines, in the same windows.
    slice_text = val_text[:val_text.rfind("\n", 0, TEST_SLICE_CHARS) + 1]
    slice_wins = windows(encode(slice_text), CONTEXT)
    slice_loss = mean_loss(engine.model, slice_wins)
    tps32, sample = decode_speed(engine, "ROMEO:", 200)
    engine16 = kimi_engine.load(args.out, device="cpu", dtype=torch.bfloat16, progress=False)
    tps16, _ = decode_speed(engine16, "ROMEO:", 100)

    chars_per_token = len(val_text) / val_ids.numel()
    report = lambda loss: dict(loss=round(loss, 4), ppl=round(math.exp(loss), 2),  # noqa: E731
                               bits_per_char=round(loss / math.log(2) / chars_per_token, 4))
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file() and f.suffix != ".py")
    metrics = dict(
        description="scripts/train_demo.py: held-out = last 10% of tinyshakespeare.txt, scored in "
                    f"non-overlapping {CONTEXT}-token windows (float32 compute)",
        held_out_tokens=int(val[:, 1:].numel()), chars_per_token=round(chars_per_token, 3),
        float32=report(fp32_loss), bf16=report(bf16_loss), int4=report(int4_loss), unigram=report(uni_loss),
        int4_ppl_vs_bf16=round(math.exp(int4_loss - bf16_loss) - 1, 4),
        best_step=run["best"]["step"], steps=args.steps, train_minutes=round(run["seconds"] / 60, 2),
        total_minutes=round((time.perf_counter() - started) / 60, 2), threads=args.threads,
        seed=args.seed, batch=args.batch, context=CONTEXT, lr=args.lr, gamma=args.gamma,
        parameters=sum(p.numel() for p in model.parameters()), package_bytes=size,
        expert_load=[[round(x, 4) for x in row] for row in loads.tolist()],
        decode_tokens_per_s=dict(float32=round(tps32, 1), bfloat16=round(tps16, 1)),
        greedy_sample=dict(prompt="ROMEO:", text=sample),
        test_slice=dict(text=slice_text, num_tokens=int(slice_wins.shape[0] * CONTEXT + 1), window=CONTEXT,
                        loss_float32=round(slice_loss, 6)),
        history=run["history"],
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")

    print(f"\n{'model':<22}{'loss':>8}{'ppl':>10}{'bits/char':>11}")
    for name, key in (("float32 (trained)", "float32"), ("bf16 checkpoint", "bf16"),
                      ("INT4 experts (shipped)", "int4"), ("unigram baseline", "unigram")):
        m = metrics[key]
        print(f"{name:<22}{m['loss']:>8.4f}{m['ppl']:>10.2f}{m['bits_per_char']:>11.4f}")
    print(f"INT4 perplexity vs bf16: {100 * metrics['int4_ppl_vs_bf16']:+.2f}%   best step {metrics['best_step']}"
          f"   training {metrics['train_minutes']} min, total {metrics['total_minutes']} min")
    print(f"\nexpert load on the held-out set (% of routed slots; even = {100 / config.n_routed_experts:.2f}%):")
    print("layer " + "".join(f"{e:>6d}" for e in range(config.n_routed_experts)) + "   min/mean  max/mean")
    for layer, row in enumerate(loads.tolist(), start=config.first_k_dense_replace):
        mean = 1 / len(row)
        print(f"{layer:>5d} " + "".join(f"{100 * x:6.2f}" for x in row) + f"   {min(row) / mean:8.2f}  {max(row) / mean:8.2f}")
    print(f"\ndecode (greedy, CPU, {args.threads} threads): {tps32:.1f} tok/s float32, {tps16:.1f} tok/s bf16")
    print(f"package: {size / 2**20:.2f} MiB in {args.out}")
    print(f"\nROMEO:{sample}")
    if loads.min() == 0:
        raise SystemExit("an expert received no tokens on the held-out set")


if __name__ == "__main__":
    main()
