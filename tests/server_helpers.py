"""A real kimi-engine server on a loopback port, in a thread of the test process (so a test can also look
at the engine behind it), and the demo engine the server tests share."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from functools import lru_cache

import httpx
import torch

import kimi_engine
from kimi_engine.server import create_app

MODEL = "kimi-engine-demo"


@lru_cache(maxsize=None)
def demo_engine(max_batch_size: int = 8):
    """The demo engine, loaded once per test process (the server test modules share it; each test leaves it idle)."""
    return kimi_engine.load(device="cpu", dtype=torch.float32, progress=False, max_batch_size=max_batch_size)


class RunningServer:
    def __init__(self, app, server, thread, port: int):
        self.app, self.server, self.thread, self.port = app, server, thread, port
        self.url = f"http://127.0.0.1:{port}"
        self.state = app.state.kimi

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


@contextmanager
def running_server(engine_or_loader, **kwargs):
    """create_app(engine_or_loader, **kwargs) served by uvicorn on 127.0.0.1:<free port> until the block ends."""
    import uvicorn

    kwargs.setdefault("model_name", MODEL)
    app = create_app(engine_or_loader, **kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(app, server, thread, port)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
