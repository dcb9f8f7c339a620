"""`kimi-engine serve`: the command's flags and its entry point (uvicorn; torchrun ranks)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
from pathlib import Path
from typing import Callable

log = logging.getLogger("kimi_engine.server")

DEMO_NAME = "kimi-engine-demo"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {low}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """serve's own flags (--model, --device and --dtype come from the CLI's shared ones)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0: all)")
    p.add_argument("--port", type=_int_at_least(0), default=8000)
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /v1 and /tokenize (default: $KIMI_ENGINE_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint directory's name, or kimi-engine-demo)")
    p.add_argument("--max-batch-size", type=_int_at_least(1), default=8, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=_int_at_least(2), default=None, help="longest prompt + completion (default: the config's)")
    p.add_argument("--kv-cache-tokens", type=_int_at_least(1), default=None,
                   help="latent KV cache budget in tokens, shared by all sequences (default: memory)")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse cached prompt prefixes")
    p.add_argument("--max-queue", type=_int_at_least(0), default=512,
                   help="sampling paths that may wait beyond the running batch; past that, 429 with retry-after")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may finish after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def load_kwargs(args, accepted) -> dict:
    """load()'s keyword arguments from the flags; accepted: the names load() takes (flags for features
    this engine build lacks are refused rather than dropped)."""
    wanted = {"max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len,
              "kv_cache_tokens": args.kv_cache_tokens, "prefix_cache": False if args.no_prefix_cache else None}
    out = {}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"--{name.replace('_', '-')}: this engine build's load() has no {name}")
        out[name] = value
    return out


def serve(args, load_engine: Callable[..., object]) -> int:
    """Serve until SIGTERM/SIGINT. load_engine(**kwargs) loads the engine (on this rank's share under
    torchrun). Rank 0 serves HTTP and schedules; every other rank follows rank 0's steps until it closes."""
    import inspect

    import uvicorn

    from ..runtime import engine as engine_module
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = load_kwargs(args, inspect.signature(engine_module.load).parameters)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not all(hasattr(engine_module.Engine, m) for m in ("lead", "follow")):
        raise ValueError("serving under torchrun needs an engine with lead() and follow(); this build has none")
    if rank != 0:
        # torchrun hands SIGTERM/SIGINT to every rank: a follower leaves only when rank 0, having drained,
        # closes the engine (leaving earlier would hang rank 0's next collective).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        load_engine(**kwargs).follow()      # rank 0's steps, until rank 0 closes the engine
        return 0
    api_key = args.api_key or os.environ.get("KIMI_ENGINE_API_KEY") or None
    name = args.served_model_name or (Path(args.model).name if args.model else DEMO_NAME)
    failed: list[BaseException] = []

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    def on_shutdown(engine) -> None:
        close = getattr(engine, "close", None)
        if close is not None:
            close()                # under torchrun this releases the followers

    def load_and_warm():
        # The first forward pass pays one-time costs (INT4 weight conversion, allocator growth, kernel
        # compiles): a few tokens here, so that /health says 200 only once a request runs at full speed.
        engine = load_engine(**kwargs)
        if world > 1:
            engine.lead()   # rank 0 alone takes requests now: calls stream, and run side by side, unmirrored
        prompt = [engine.config.bos_token_id or 0] * 8
        engine.generate(prompt, max_new_tokens=2, temperature=0.0)
        return engine

    app = create_app(load_and_warm, model_name=name, api_key=api_key, max_queue=args.max_queue,
                     shutdown_grace=args.shutdown_timeout, on_load_error=on_load_error, on_shutdown=on_shutdown)
    # uvicorn's own deadline comes after the host's (which aborts what still runs, so it ends cleanly).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=math.ceil(args.shutdown_timeout) + 5)
    host = app.state.kimi.host

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            host.begin_shutdown(args.shutdown_timeout)
            super().handle_exit(sig, frame)
    server = Server(config)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who reaches it can use the model", args.host)
    # uvicorn re-raises the signal it stopped on once it has drained; a no-op handler by then makes a
    # drained SIGTERM (or Ctrl-C) exit 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failed:
        print(f"error: the model failed to load: {failed[0]}")
        return 1
    return 0
