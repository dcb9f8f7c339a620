"""What the routes share: the server's state, engine errors as HTTP errors, and the two ways an engine
stream reaches the client (SSE chunks, or one body once it ends)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from .errors import ApiError
from .host import Admission, EngineHost, EngineStream
from .metrics import Metrics

log = logging.getLogger("kimi_engine.server")


@dataclass
class ServerState:
    host: EngineHost
    metrics: Metrics
    model_name: str
    api_key: str | None
    shutdown_grace: float

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")


def render_chat(engine, messages: list[dict], tools: list[dict] | None, thinking: bool) -> list[int]:
    """The prompt token ids engine.chat will run for these messages."""
    return engine.chat_prompt(messages, tools, thinking=thinking)


_ARGUMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)")


def engine_error(e: ValueError, renames: dict[str, str]) -> ApiError:
    """An engine ValueError (which names the argument first, "n=9: must be ...") as a 400 naming the
    request field: renames maps engine argument names to the API's (max_new_tokens -> max_tokens)."""
    text = str(e)
    match = _ARGUMENT.match(text)
    param = renames.get(match.group(1), match.group(1)) if match else None
    code = "context_length_exceeded" if "max_seq_len" in text else None
    return ApiError(400, text, param, code)


async def start(admission: Admission, factories, renames: dict[str, str]) -> EngineStream:
    """Start the engine calls; their argument errors become 400s (the slots are released then)."""
    stream = admission.stream_of(factories)
    try:
        await stream.started()
    except ValueError as e:
        admission.release()
        raise engine_error(e, renames) from None
    except BaseException:
        admission.release()
        raise
    return stream


_SHUTDOWN = ApiError(503, "the server shut down before this request finished", None, "shutting_down")


def _error_event(e: BaseException) -> str:
    status = 400 if isinstance(e, ValueError) else 500
    if not isinstance(e, ValueError):
        log.error("engine stream failed", exc_info=e)
    return json.dumps(ApiError(status, f"{type(e).__name__}: {e}", None, "engine_error").body())


def sse(state: ServerState, stream: EngineStream, admission: Admission, acc, feed, finish) -> EventSourceResponse:
    """Stream OpenAI chunks as server-sent events, then the usage chunk (when asked) and [DONE].

    feed(index, item) -> chunks; finish() runs once the stream ends, however it ends. A client that
    goes away cancels this generator (sse-starlette watches for the disconnect): `finally` releases
    the slots, which cancels the engine stream and so aborts the request in the engine.
    """
    finished = []

    def cleanup():   # once, however the response ends
        if not finished:
            finished.append(True)
            admission.release()
            finish()

    async def events():
        try:
            async for index, item in stream:
                for chunk in feed(index, item):
                    yield json.dumps(chunk, ensure_ascii=False)
            if stream.cancelled:    # cut by the shutdown deadline (a client that left reads nothing more)
                yield json.dumps(_SHUTDOWN.body())
            elif acc.include_usage:
                yield json.dumps(acc.usage_chunk(), ensure_ascii=False)
        except Exception as e:   # noqa: BLE001 - headers are sent: the error goes in the stream
            yield _error_event(e)
        finally:
            cleanup()
        yield "[DONE]"

    # The host cuts streams at the shutdown deadline (EngineHost.begin_shutdown) and the stream then ends
    # with an error event and [DONE]; sse-starlette's own cut-off comes later, only as a backstop.
    return _GuardedSSE(events(), cleanup, ping=15, shutdown_grace_period=state.shutdown_grace + 2)


class _GuardedSSE(EventSourceResponse):
    """An SSE response that runs `cleanup` when it ends: a client gone before the first event means the
    body generator never starts, so its own `finally` would never run and the slots would leak."""

    def __init__(self, content, cleanup, **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, stream: EngineStream, admission: Admission, feed, finish, body) -> JSONResponse:
    """Run the stream to its end and answer with body(); a client that hangs up first aborts it."""
    async def consume():
        async for index, item in stream:
            feed(index, item)

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                           "param": None, "code": "client_disconnected"}}, status_code=499)
        e = work.exception()
        if e is None and stream.cancelled:
            raise _SHUTDOWN
        if isinstance(e, ValueError):
            raise engine_error(e, {})
        if e is not None:
            raise e
        return JSONResponse(body())
    finally:
        watch.cancel()
        admission.release()
        finish()
