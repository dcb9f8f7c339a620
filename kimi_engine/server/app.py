"""The ASGI app: routes, API-key check, loading in the background, and what shutting down does."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import errors
from .chat import chat_completions, engine_messages
from .common import ServerState, render_chat
from .completions import completions
from .errors import ApiError
from .host import EngineHost
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("kimi_engine.server")


_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
              "/metrics"}


class _CountResponses:
    """kimi_engine_requests_total{endpoint, status}. Pure ASGI (not BaseHTTPMiddleware, which would sit
    between a streaming response and the client's disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        # Only the server's own paths become labels: a scan of random paths must not grow the registry.
        path = scope["path"] if scope["path"] in _ENDPOINTS or scope["path"].startswith("/v1/models/") else "other"
        path = "/v1/models/{model}" if path.startswith("/v1/models/") else path

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)


def create_app(engine_or_loader, *, model_name: str, api_key: str | None = None, max_queue: int = 512,
               shutdown_grace: float = 30.0, on_load_error: Callable[[BaseException], None] | None = None,
               on_shutdown: Callable[[object], None] | None = None) -> FastAPI:
    """engine_or_loader: a loaded engine, or a callable that loads one; it then runs in a thread at startup,
    and /health answers 503 until it returns (on_load_error(e) hears of a failure). shutdown_grace:
    seconds a running stream may go on after SIGTERM. on_shutdown(engine) runs last (e.g. engine.close())."""
    host = EngineHost(max_queue)
    state = ServerState(host, Metrics(host), model_name, api_key, shutdown_grace)

    def load():
        try:
            host.set_engine(engine_or_loader())
            log.info("model loaded: %s", model_name)
        except BaseException as e:   # noqa: BLE001 - reported by /health and on_load_error
            log.exception("loading the model failed")
            host.error = e
            if on_load_error is not None:
                on_load_error(e)

    @asynccontextmanager
    async def lifespan(app):
        if callable(engine_or_loader) and not hasattr(engine_or_loader, "generate"):
            threading.Thread(target=load, daemon=True, name="kimi-load").start()
        else:
            host.set_engine(engine_or_loader)
        yield
        # uvicorn has stopped accepting and waited for the running requests (up to its graceful
        # timeout); whatever still runs is aborted here, then the engine is let go.
        host.draining = True
        host.abort_all()
        for stream in list(host.streams):
            await anyio.to_thread.run_sync(stream.join, 5.0)
        if on_shutdown is not None and host.engine is not None:
            await anyio.to_thread.run_sync(on_shutdown, host.engine)

    app = FastAPI(title="kimi-engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kimi = state
    errors.install(app)
    app.add_middleware(_CountResponses, metrics=state.metrics)

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY" if given else
                           "missing API key: send Authorization: Bearer KEY", None, "invalid_api_key",
                           {"www-authenticate": "Bearer"})

    v1 = APIRouter(dependencies=[Depends(authorized)])

    @v1.post("/v1/chat/completions")
    async def _chat(body: ChatCompletionRequest, request: Request):
        return await chat_completions(state, body, request)

    @v1.post("/v1/completions")
    async def _completions(body: CompletionRequest, request: Request):
        return await completions(state, body, request)

    def model_card() -> dict:
        engine = host.require_engine()
        return {"id": model_name, "object": "model", "created": int(start_time), "owned_by": "kimi-engine",
                "max_model_len": engine.max_seq_len}

    @v1.get("/v1/models")
    async def _models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/v1/models/{model:path}")
    async def _model(model: str):
        state.check_model(model)
        return model_card()

    # Tokenizing takes engine work too: behind the key like /v1 (health and metrics stay open to probes).
    @v1.post("/tokenize")
    async def _tokenize(body: TokenizeRequest):
        body.check()
        state.check_model(body.model)
        engine = host.require_engine()
        if body.prompt is not None:
            ids = await anyio.to_thread.run_sync(engine.tokenizer.encode, body.prompt)
        else:
            chat = ChatCompletionRequest(messages=body.messages, tools=body.tools,
                                         chat_template_kwargs=body.chat_template_kwargs)
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            thinking = body.chat_template_kwargs.thinking if body.chat_template_kwargs else True
            ids = await anyio.to_thread.run_sync(render_chat, engine, engine_messages(chat), tools, thinking)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @v1.post("/detokenize")
    async def _detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        engine = host.require_engine()
        bad = [t for t in body.tokens if not 0 <= t < engine.config.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: id {bad[0]} outside [0, vocab_size={engine.config.vocab_size})", "tokens")
        return {"prompt": await anyio.to_thread.run_sync(engine.tokenizer.decode, body.tokens)}

    app.include_router(v1)

    @app.get("/health")
    async def _health():
        if host.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if host.engine is None:
            body = {"status": "failed", "error": str(host.error)} if host.error else {"status": "loading"}
            return JSONResponse(body, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def _metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    start_time = time.time()
    return app
