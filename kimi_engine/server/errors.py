"""OpenAI's error body, {"error": {"message", "type", "param", "code"}}, for every failure the server answers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("kimi_engine.server")

# OpenAI's error types by status (what its clients map to exception classes).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request the server answers with `status` and OpenAI's error body; param names the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}
_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool"}   # the messages union's tags


def field_path(loc) -> str | None:
    """pydantic's loc ('body', 'messages', 0, 'user', 'content') -> 'messages[0].content', the form OpenAI's
    param takes: the body prefix, union members (str, literal[...], NamedToolChoice) and union tags go."""
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "body" and previous is None:
            pass
        elif not part.isidentifier() or part in _TYPE_NAMES or part[:1].isupper() or "[" in part:
            pass
        elif isinstance(previous, int) and part in _ROLE_TAGS and out.endswith("]") and out.startswith("messages"):
            pass
        else:
            out += f".{part}" if out else part
        previous = part
    return out or None


def _validation_message(err: dict) -> str:
    where = field_path(err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', msg)}"
    if err.get("type") == "union_tag_invalid" and err.get("ctx"):
        return f"{where}: unknown {err['ctx'].get('discriminator', 'tag')} {err['ctx'].get('tag')!r}; " \
               f"expected one of {err['ctx'].get('expected_tags')}"
    return f"{where}: {msg}" if where else msg


def install(app: FastAPI) -> None:
    """Route every error, ours and the framework's, through OpenAI's body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = None if first.get("type") == "json_invalid" else field_path(first.get("loc", ()))
        if first.get("type") == "union_tag_invalid" and param:   # the field at fault is the tag itself
            param += "." + first.get("ctx", {}).get("discriminator", "").strip("'")
        message = "; ".join(_validation_message(e) for e in errors[:5])
        return ApiError(400, message or "invalid request", param, first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug must cost one request, never the server: log it whole, answer 500.
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error").response()
