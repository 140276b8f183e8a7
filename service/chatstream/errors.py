"""One error type, carrying its status, its code and the fields of the one JSON shape; no HTTP here.

Every error the service answers has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``: a client mistake is a 4xx
``ChatStreamError``, a refusal to queue is ``Rejected`` (503/429 with
``Retry-After``), and anything else is a 500 that never echoes internals
beyond the exception's message. Only ``server/responses.py`` turns them into
responses (``error_response``, and the handlers ``install`` adds to an app).
"""

from __future__ import annotations


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

