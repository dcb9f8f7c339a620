"""Constrained decoding overhead per decode step: apply_masks at batch 1 and 8, demo and Kimi-size vocabularies.

    python benchmarks/bench_grammar.py [--device cpu|cuda] [--steps 200]

Every row is constrained by a forced tool call (tool_choice="required" over four tools with nested
objects, arrays, enums, bounded integers) and walks through it as a decode loop would: mask the
logits, take the best allowed token of random logits, accept it; a finished row starts over. The
demo's tokenizer has 4,096 ids; the Kimi-size one is synthetic (163,584 random byte-level tokens
plus Kimi's 256 special ids, 163,840 in all, the real vocabulary's size), built in Kimi's tiktoken
format and read by kimi_engine.chat.tokenizer exactly as a checkpoint's. Columns: apply_masks (the
whole step's masking: llguidance fills the bitmasks, then the upload and masked_fill), of which
llguidance's bitmask fill, and accept (advancing each row's matcher by its token), ms per step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_engine.demo import demo_path  # noqa: E402
from kimi_engine.runtime.grammar import GrammarCompiler, apply_masks  # noqa: E402
from kimi_engine.chat.tokenizer import KIMI_SPECIAL_TOKENS, load_tokenizer, write_kimi_tokenizer  # noqa: E402

KIMI_VOCAB, KIMI_BASE = 163_840, 163_584
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]},
    "book": {"type": "object", "properties": {
        "guest": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["name"], "additionalProperties": False},
        "nights": {"type": "integer", "minimum": 1, "maximum": 30}}, "required": ["guest", "nights"]},
    "tag": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                      "maxItems": 4}, "pinned": {"type": "boolean"}}},
    "search": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                                "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
               "required": ["query"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS.items()]


def kimi_size_tokenizer(directory: Path):
    """163,584 distinct byte-level tokens (all 256 bytes, the demo's, then random pieces) + Kimi's specials."""
    rng = random.Random(0)
    demo = load_tokenizer(demo_path())
    tokens = list(dict.fromkeys([bytes([b]) for b in range(256)] + demo.token_bytes[:demo.vocab_size - 256]))
    seen = set(tokens)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_{}[]\":,.-"
    while len(tokens) < KIMI_BASE:
        piece = (" " if rng.random() < 0.5 else "") + "".join(rng.choices(alphabet, k=rng.randint(2, 9)))
        piece = piece.encode()
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
    write_kimi_tokenizer(directory, tokens, KIMI_SPECIAL_TOKENS)
    return load_tokenizer(directory)


def bench(compiler: GrammarCompiler, batch: int, steps: int, device: torch.device) -> tuple[float, float, float]:
    grammar = compiler.compile(tools=TOOLS, tool_choice="required", thinking=False, parallel_tool_calls=False)
    matchers = [grammar.matcher() for _ in range(batch)]
    gen = torch.Generator(device=device).manual_seed(0)
    masker = compiler.masker(device)
    fill_time = []
    fill = masker._fill

    def timed_fill(*args):                              # llguidance's share of apply_masks, as it runs there
        start = time.perf_counter()
        fill(*args)
        fill_time.append(time.perf_counter() - start)
    masker._fill = timed_fill
    total, fills, accept = [], [], []
    try:
        for step in range(steps + 10):                  # the first 10 steps warm up
            logits = torch.randn(batch, compiler.vocab_size, generator=gen, device=device)
            sync(device)
            t0 = time.perf_counter()
            apply_masks(logits, matchers)
            sync(device)
            t1 = time.perf_counter()
            tokens = logits.argmax(-1).tolist()
            t2 = time.perf_counter()
            for m, t in zip(matchers, tokens):
                m.accept(t)
                if m.is_finished():
                    m.reset()
            t3 = time.perf_counter()
            if step >= 10:
                total.append(t1 - t0)
                fills.append(fill_time[-1])
                accept.append(t3 - t2)
    finally:
        del masker._fill
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return ms(total), ms(fills), ms(accept)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    demo = load_tokenizer(demo_path())
    compilers = [("demo", GrammarCompiler(demo, demo.vocab_size))]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        big = kimi_size_tokenizer(Path(tmp))
        built = time.perf_counter()
        compilers.append(("kimi-size (synthetic)", GrammarCompiler(big, KIMI_VOCAB)))
        print(f"synthetic tokenizer: {big.vocab_size} ids, built in {built - start:.1f} s; "
              f"GrammarCompiler (llguidance tokenizer) in {time.perf_counter() - built:.2f} s")
    for name, compiler in compilers:
        start = time.perf_counter()
        compiler.compile(tools=TOOLS, tool_choice="required", thinking=False, parallel_tool_calls=False)
        print(f"{name}: tool-call grammar compiled in {(time.perf_counter() - start) * 1e3:.1f} ms "
              f"(then cached)")
    print(f"\ndevice {device}, {torch.get_num_threads()} torch threads; ms per decode step (median of {args.steps})")
    print(f"{'vocabulary':>24} {'vocab':>8} {'batch':>5} {'apply_masks':>12} {'llg fill':>9} {'accept':>7}")
    for name, compiler in compilers:
        for batch in (1, 8):
            total, fill, accept = bench(compiler, batch, args.steps, device)
            print(f"{name:>24} {compiler.vocab_size:>8} {batch:>5} {total:>12.3f} {fill:>9.3f} {accept:>7.3f}")


if __name__ == "__main__":
    main()
