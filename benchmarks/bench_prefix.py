"""The prefix cache and chunked prefill on the demo model (CPU).

1. A stateless conversation, as an HTTP client sends it: every round resends the whole message list
   plus one new user turn. Per round: prompt tokens, tokens served from the prefix cache, tokens
   prefilled, and the round's wall time, for an engine with the cache and one without, run
   alternately round by round in one process.
2. A long prompt arriving while 4 sequences decode: the gaps between one decoding sequence's tokens,
   with the step budget (prefill_chunk) at 128 tokens and at 2048 (the whole prompt in one step).

    python benchmarks/bench_prefix.py [--rounds 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kimi_engine as ke


def conversation(args) -> None:
    on = ke.load(device="cpu", dtype=torch.float32, progress=False)
    off = ke.load(device="cpu", dtype=torch.float32, progress=False, prefix_cache=False)
    history = {"on": [], "off": []}
    rows = {"on": [], "off": []}
    for r in range(args.rounds):
        for name, engine in (("on", on), ("off", off)) if r % 2 == 0 else (("off", off), ("on", on)):
            messages = history[name] + [{"role": "user", "content": f"Say on, {r}."}]
            if len(engine.chat_prompt(messages, thinking=False)) + args.reply >= engine.max_seq_len:
                break
            start = time.perf_counter()
            reply = engine.chat(messages, thinking=False, max_new_tokens=args.reply, temperature=0)
            seconds = time.perf_counter() - start
            u = reply["usage"]
            rows[name].append((r + 1, u["prompt_tokens"], u["cached_tokens"], u["prompt_tokens"] - u["cached_tokens"],
                               seconds))
            history[name] = messages + [{"role": "assistant", "content": reply["content"]}]
        else:
            continue
        break
    done = min(len(rows["on"]), len(rows["off"]))
    print(f"## stateless conversation: {done} rounds on the demo (context {on.max_seq_len} tokens), "
          f"{args.reply}-token replies, greedy")
    print("| round | prompt | cached (on) | prefilled (on) | prefilled (off) | ms (on) | ms (off) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(done):
        a, b = rows["on"][i], rows["off"][i]
        if i < 3 or (i + 1) % 10 == 0 or i == done - 1:
            print(f"| {a[0]} | {a[1]:,} | {a[2]:,} | {a[3]:,} | {b[3]:,} | {a[4] * 1e3:,.1f} | {b[4] * 1e3:,.1f} |")
    pre_on, pre_off = sum(r[3] for r in rows["on"][:done]), sum(r[3] for r in rows["off"][:done])
    t_on, t_off = sum(r[4] for r in rows["on"][:done]), sum(r[4] for r in rows["off"][:done])
    appended = [rows["on"][i][1] - (rows["on"][i - 1][1] + args.reply - 1) for i in range(1, done)]
    print(f"\ntotal prefilled: {pre_on:,} tokens with the cache, {pre_off:,} without ({pre_off / max(pre_on, 1):.1f}x); "
          f"time {t_on:.1f} s vs {t_off:.1f} s ({t_off / t_on:.2f}x)")
    if appended:
        over = [rows["on"][i][3] - appended[i - 1] for i in range(1, done)]
        print(f"per round after the first: prefilled - appended = median {statistics.median(over):.0f}, "
              f"max {max(over)} tokens (the previous round's partly filled block; at most {on.blocks.block_size - 1} "
              "when the template re-renders the reply as it was generated)\n")


def long_prompt_while_decoding(args) -> None:
    print("## a 900-token prompt arriving while 4 sequences decode (demo, float32, greedy)")
    print("| step budget | gaps between one sequence's tokens: median ms | max ms | steps the prompt took |")
    print("|---:|---:|---:|---:|")
    for budget in (128, 2048):
        engine = ke.load(device="cpu", dtype=torch.float32, progress=False, prefill_chunk=budget)
        prompts = [engine.tokenizer.encode(f"{name}:\n") for name in ("ROMEO", "JULIET", "Nurse", "TYBALT")]
        streams = [engine.generate(p, max_new_tokens=80, temperature=0, stop_token_ids=[], stream=True) for p in prompts]
        gaps, last, long_stream, prompt_steps = [], None, None, 0
        long_ids = engine.tokenizer.encode("But soft, what light through yonder window breaks? " * 60)[:900]
        for i in range(60):
            for s in streams[1:]:
                next(s)
            next(streams[0])
            now = time.perf_counter()
            if last is not None:
                gaps.append((now - last) * 1e3)
            last = now
            if i == 20:
                long_stream = engine.generate(long_ids, max_new_tokens=4, temperature=0, stream=True)
                before = engine.stats.prefill_tokens
            if long_stream is not None and engine.stats.prefill_tokens - before < len(long_ids):
                prompt_steps += 1
        print(f"| {budget:,} | {statistics.median(gaps):.1f} | {max(gaps):.1f} | {prompt_steps} |")
        for s in streams + [long_stream]:
            s.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--reply", type=int, default=3, help="tokens per reply (the demo's context is 1,024 tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    conversation(args)
    long_prompt_while_decoding(args)


if __name__ == "__main__":
    main()
