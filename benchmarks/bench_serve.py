"""kimi-engine serve under load, on loopback: a real `kimi-engine serve` process and asyncio clients.

1. Concurrency sweep: C clients each send streamed chat requests back to back, a bounded number in all
   (--requests-per-client, at least --min-requests), and we report requests/s, output tokens/s, time to
   first token and time per output token (median, p99) and errors (which must be 0).
2. Agent workload: --conversations conversations of --rounds rounds each resend their whole history
   plus one new user turn (what an agent harness does), once against a server with the prefix cache and
   once with --no-prefix-cache: the prefix-cache hit rate (cached / prompt tokens, from usage) and the
   tokens actually prefilled.

    python benchmarks/bench_serve.py                      # the demo, CPU
    python benchmarks/bench_serve.py --model /models/Kimi-K2-Thinking --device cuda

Every request loop is bounded in count (and each request in time); the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LINES = ["Tell me of the king.", "What news from Verona?", "Speak of the storm at sea.", "Who goes there?",
         "Describe the feast.", "What says the herald?", "Why weeps the queen?", "Where lies the army?"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


class Server:
    """`python -m kimi_engine.cli serve` on a free loopback port, until stop()."""

    def __init__(self, args, extra: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kimi_engine.cli", "serve", "--port", str(self.port), "--log-level", "warning",
               "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024"] + extra
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + args.load_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError("the server did not become healthy in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    """One streamed chat request -> {ttft, tpot, tokens, usage, content, error}."""
    start, first, content, usage = time.perf_counter(), None, [], None
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}, "chat_template_kwargs": {"thinking": False}}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    delta = choice["delta"]
                    piece = delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
                    if piece and first is None:
                        first = time.perf_counter()
                    content.append(delta.get("content") or "")
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if usage is None:
        return {"error": "no usage chunk"}
    tokens = usage["completion_tokens"]
    return {"ttft": (first or end) - start, "tpot": (end - first) / (tokens - 1) if first and tokens > 1 else None,
            "tokens": tokens, "usage": usage, "content": "".join(content), "error": None}


async def sweep_level(url: str, concurrency: int, requests: int, args) -> dict:
    """`concurrency` clients share `requests` requests, each client sending its next as its last one ends."""
    results: list[dict] = []
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        async def worker():
            for i in remaining:
                messages = [{"role": "user", "content": LINES[i % len(LINES)]}]
                results.append(await chat(client, messages, args.max_tokens, args.request_timeout))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "first_error": errors[:1],
            "rps": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall, "wall": wall,
            "ttft_p50": statistics.median(ttft) if ttft else float("nan"), "ttft_p99": percentile(ttft, 99),
            "tpot_p50": statistics.median(tpot) if tpot else float("nan"), "tpot_p99": percentile(tpot, 99)}


async def agent_workload(url: str, args) -> dict:
    """Conversations that resend their growing history every round, side by side."""
    totals = {"prompt": 0, "cached": 0, "requests": 0, "errors": 0}
    system = {"role": "system", "content": "You are a herald of the court. Answer in the manner of the plays. " * 6}
    async with httpx.AsyncClient(base_url=url) as client:
        async def conversation(c: int):
            history = [system]
            for r in range(args.rounds):
                history.append({"role": "user", "content": f"Round {r}: {LINES[(c + r) % len(LINES)]}"})
                out = await chat(client, history, args.agent_max_tokens, args.request_timeout)
                totals["requests"] += 1
                if out["error"] is not None:
                    totals["errors"] += 1
                    return
                totals["prompt"] += out["usage"]["prompt_tokens"]
                totals["cached"] += out["usage"]["prompt_tokens_details"]["cached_tokens"]
                history.append({"role": "assistant", "content": out["content"]})
        start = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
        totals["wall"] = time.perf_counter() - start
    totals["prefilled"] = totals["prompt"] - totals["cached"]
    totals["hit_rate"] = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
    return totals


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, no GPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,16,64", help="client counts, e.g. 1,4,16,64")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24, help="per request of the sweep")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--agent-max-tokens", type=int, default=12)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-agent", action="store_true")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--load-timeout", type=float, default=900)
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"machine: {machine()}; model: {args.model or 'built-in demo'}; max_batch_size {args.max_batch_size}")
    failed = False
    if not args.skip_sweep:
        server = Server(args, [])
        try:
            print(f"\nstreamed chat, max_tokens {args.max_tokens}, thinking off\n"
                  "| concurrency | requests | errors | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
                  "| TPOT p50 ms | TPOT p99 ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for c in levels:
                n = max(args.min_requests, c * args.requests_per_client)
                r = asyncio.run(sweep_level(server.url, c, n, args))
                failed |= r["errors"] > 0
                print(f"| {c} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | {r['tok_s']:.1f} | "
                      f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['tpot_p50'] * 1e3:.1f} | "
                      f"{r['tpot_p99'] * 1e3:.1f} |" + (f" first error: {r['first_error']}" if r["errors"] else ""),
                      flush=True)
        finally:
            server.stop()
    if not args.skip_agent:
        print(f"\nagent workload: {args.conversations} conversations x {args.rounds} rounds, history resent each "
              f"round, max_tokens {args.agent_max_tokens}\n| prefix cache | requests | errors | prompt tokens | "
              "cached | hit rate | prefilled | wall s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, extra in (("on", []), ("off", ["--no-prefix-cache"])):
            try:
                server = Server(args, extra)
            except RuntimeError as e:   # an engine build without the switch refuses the flag
                print(f"| {label} | - | - | - | - | - | - | - | ({e})")
                failed = True
                continue
            try:
                t = asyncio.run(agent_workload(server.url, args))
            finally:
                server.stop()
            failed |= t["errors"] > 0
            print(f"| {label} | {t['requests']} | {t['errors']} | {t['prompt']:,} | {t['cached']:,} | "
                  f"{t['hit_rate']:.1%} | {t['prefilled']:,} | {t['wall']:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
