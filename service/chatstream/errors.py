"""One error type, one JSON shape, one place that turns exceptions into responses.

Every error the service answers has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``: a client mistake is a 4xx
``ChatStreamError``, a refusal to queue is ``Rejected`` (503/429 with
``Retry-After``), and anything else is a 500 that never echoes internals
beyond the exception's message.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

log = logging.getLogger("chatstream")


class ChatStreamError(Exception):
    """An error with its HTTP status and the fields of the JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code or type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Rejected(ChatStreamError):
    """No queue place: the queue is full, or the server is draining."""

    def __init__(self, status: int, retry_after: int, message: str, reason: str):
        super().__init__(status, message, "unavailable" if status == 503 else "too_many_requests",
                         headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after
        self.reason = reason


def bad_request(message: str, param: str | None = None, code: str = "invalid_request_error") -> ChatStreamError:
    return ChatStreamError(400, message, "invalid_request_error", param, code)


def describe(problems: list[dict]) -> str:
    """Pydantic's validation errors as one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in problems)


def from_exception(exc: BaseException) -> ChatStreamError:
    """The error for any exception: itself when it already is one, else a 500."""
    if isinstance(exc, ChatStreamError):
        return exc
    return ChatStreamError(500, f"internal error: {exc}" if str(exc) else "internal error", "internal_error")


def install(app) -> None:
    """Make ``app`` answer every error, its own and the framework's (404, 405, validation), in the one shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def own(request, exc: ChatStreamError):
        return exc.response()

    async def http(request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 503: "unavailable"}.get(exc.status_code, "http_error")
        return ChatStreamError(exc.status_code, str(exc.detail), kind, headers=exc.headers).response()

    async def validation(request, exc: RequestValidationError):
        return bad_request(describe(exc.errors())).response()

    async def unexpected(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return from_exception(exc).response()

    app.add_exception_handler(ChatStreamError, own)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, unexpected)
