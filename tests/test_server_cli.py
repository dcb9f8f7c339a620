"""`kimi-engine serve` as a real process: it loads, serves, and exits cleanly on SIGTERM mid-stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.server_helpers import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_exits_cleanly_on_sigterm_mid_stream():
    port = _free_port()
    env = {**os.environ, "KIMI_ENGINE_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_engine.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--shutdown-timeout", "2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        def healthy():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        assert wait_until(healthy, timeout=120, interval=0.2), proc.stderr.read() if proc.poll() is not None else ""
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "kimi-engine-demo"
        events: list[str] = []

        def stream():   # long enough (~15 s on a CPU) that SIGTERM lands in the middle
            with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=60, json={
                    "prompt": "ROMEO:", "max_tokens": 800, "stream": True}) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))
        reader = threading.Thread(target=stream)
        reader.start()
        assert wait_until(lambda: len(events) >= 3, timeout=30)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        reader.join(10)
        assert time.monotonic() - start < 15, "the stream was not cut after --shutdown-timeout"
        assert 3 <= len(events) < 800
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
