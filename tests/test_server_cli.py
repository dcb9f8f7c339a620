"""`kimi-engine serve` as a real process: it loads, serves, and exits cleanly on SIGTERM mid-stream;
its flags reach load()."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kimi_engine.runtime import engine as engine_module
from kimi_engine.server.main import add_arguments, load_kwargs
from tests.server_helpers import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def healthy(url: str) -> bool:
    """Whether the server at url answers /health with 200 (not yet listening counts as not healthy)."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False

def test_serve_command_exits_cleanly_on_sigterm_mid_stream():
    port = _free_port()
    env = {**os.environ, "KIMI_ENGINE_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_engine.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--shutdown-timeout", "0.2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        assert wait_until(lambda: healthy(url), timeout=120, interval=0.2), proc.stderr.read() if proc.poll() is not None else ""
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "kimi-engine-demo"
        events: list[str] = []

        # Greedy (no early end of text), 1,000 tokens (~1 s at ~1,000 tok/s): outlasts the 0.2 s grace.
        def stream():
            with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=60, json={
                    "prompt": "ROMEO:", "max_tokens": 1000, "temperature": 0, "stream": True}) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))
        reader = threading.Thread(target=stream)
        reader.start()
        assert wait_until(lambda: len(events) >= 3, timeout=30)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        reader.join(10)
        assert time.monotonic() - start < 15, "the stream was not cut after --shutdown-timeout"
        assert 3 <= len(events) < 1000
        assert all(json.loads(e[6:]) for e in events[:-1])
        # Cut at the deadline: the stream still ends properly, saying why.
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr
        try:
            httpx.get(url + "/health", timeout=1)
            raise AssertionError("still accepting after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rank0_child(launcher: int) -> int | None:
    """The pid of torchrun's worker with RANK=0 (found through /proc)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=0" in env:
            return int(child)
    return None


def test_serve_under_torchrun_world_size_2():
    from kimi_engine.runtime.engine import Engine
    if not hasattr(Engine, "lead"):
        pytest.skip("this engine has no lead()/follow() yet (the scheduler)")
    port, master = _free_port(), _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(master), "-m", "kimi_engine.cli", "serve", "--port", str(port),
                             "--device", "cpu", "--shutdown-timeout", "0.2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: healthy(url), timeout=180, interval=0.25), proc.stderr.read() if proc.poll() is not None else ""
        r = httpx.post(url + "/v1/completions", timeout=120, json={"prompt": "ROMEO:", "max_tokens": 6,
                                                                   "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text

        def streamed(prompt):   # two at once: they share batches, and stream token by token
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                    "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}) as s:
                return [line for line in s.iter_lines() if line.startswith("data: ")]
        with ThreadPoolExecutor(2) as pool:
            streams = list(pool.map(streamed, ["ROMEO:", "JULIET:"]))
        for lines in streams:
            assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        rank0 = _rank0_child(proc.pid)
        assert rank0 is not None
        os.kill(rank0, signal.SIGTERM)       # rank 0 drains and closes the engine, which releases rank 1
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_flags_reach_load():
    """--kv-cache-tokens, --no-prefix-cache and --max-batch-size become load()'s arguments, and a
    flag this build's load() lacks is refused, not dropped."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--kv-cache-tokens", "4096", "--no-prefix-cache", "--max-batch-size", "3"])
    kwargs = load_kwargs(args, inspect.signature(engine_module.load).parameters)
    assert kwargs == {"max_batch_size": 3, "kv_cache_tokens": 4096, "prefix_cache": False}
    engine = engine_module.load(device="cpu", progress=False, **kwargs)
    assert engine.kv_cache_tokens == 4096 and engine.max_batch_size == 3
    with pytest.raises(ValueError, match="--kv-cache-tokens: this engine build's load"):
        load_kwargs(args, {"max_batch_size", "prefix_cache"})
