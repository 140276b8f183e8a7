"""The one place errors and streams become HTTP: the JSON error response, the error handlers, ``StreamResponse``.

Every error the service answers has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` (``errors.ChatStreamError.body``);
``error_response`` is the one function that sends it, for the routes, the error
handlers, the middlewares (auth, sessions) and a stream that fails before its
first byte. The domain below (errors.py, lifecycle.py, the engine) knows no HTTP.
"""

from __future__ import annotations

import logging

from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response

from ..errors import ChatStreamError, bad_request, describe, from_exception
from ..lifecycle import (DISCONNECTED_BEFORE_STREAMING, DISCONNECTED_WHILE_STREAMING, REJECTED, SUCCESS,
                         UNKNOWN_ERROR, Stream)

log = logging.getLogger("chatstream")


def error_response(err: ChatStreamError) -> JSONResponse:
    """The JSON error response for ``err``: its status, its headers (Retry-After), the one body shape."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install(app) -> None:
    """Make ``app`` answer every error, its own and the framework's (404, 405, validation), in the one shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def own(request, exc: ChatStreamError):
        return error_response(exc)

    async def http(request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 503: "unavailable"}.get(exc.status_code, "http_error")
        return error_response(ChatStreamError(exc.status_code, str(exc.detail), kind, headers=exc.headers))

    async def validation(request, exc: RequestValidationError):
        return error_response(bad_request(describe(exc.errors())))

    async def unexpected(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(from_exception(exc))

    app.add_exception_handler(ChatStreamError, own)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, unexpected)


class Formatter:
    """How text goes on the wire: plain text deltas, streamed (``/chat_stream``)."""

    media_type = "text/plain; charset=utf-8"

    def delta(self, text: str) -> bytes | None:
        return text.encode("utf-8")

    def end(self, stream: Stream) -> bytes:
        return b""

    def failed(self, error: ChatStreamError) -> bytes | None:
        """Bytes that tell the client the stream failed after it started; None: cut the connection without
        a proper end (a plain-text client sees an incomplete body, never a clean end)."""
        return None


STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class StreamResponse(Response):
    """Sends a ``Stream``: the status line goes out with the first text, so a failure (or a refusal to queue)
    before it is still a proper JSON error response.

    As any Starlette response: ``headers`` (and what the caller adds to ``response.headers`` before it is
    sent) go out with the status line, and ``background`` runs once the response is sent. Before its last
    message, a successful stream awaits ``stream.complete()`` (the session stores the turn: a client that
    saw the end can rely on it)."""

    def __init__(self, stream: Stream, formatter: Formatter | None = None, headers: dict | None = None,
                 background: BackgroundTask | None = None):
        # A Response subclass so that frameworks pass it through untouched; it sends its own messages.
        self.stream = stream
        self.formatter = formatter or Formatter()
        self.status_code = 200
        self.media_type = self.formatter.media_type
        self.background = background
        # The content type as the formatter says it (no charset added to text/event-stream); no body attribute,
        # so no content-length.
        self.init_headers({"content-type": self.media_type, **STREAM_HEADERS, **(headers or {})})

    async def __call__(self, scope, receive, send):
        stream, fmt = self.stream, self.formatter
        started = False
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}

        async def on_text(text: str) -> bool:
            nonlocal started
            data = fmt.delta(text)
            if data is None:
                return False
            if not started:
                await send(start)
                started = True
            await send({"type": "http.response.body", "body": data, "more_body": True})
            return True

        outcome, error = await stream.run(receive, on_text)
        try:
            if outcome == SUCCESS:
                body = fmt.end(stream)
                await stream.complete()
                if not started:
                    await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif outcome in (UNKNOWN_ERROR, REJECTED):
                err = from_exception(error)
                if not started:
                    await error_response(err)(scope, receive, send)
                else:
                    tail = fmt.failed(err)
                    if tail is not None:
                        await send({"type": "http.response.body", "body": tail, "more_body": False})
                    # else: return without ending the body; the server closes the connection.
        except OSError:
            outcome = DISCONNECTED_WHILE_STREAMING if stream.streamed else DISCONNECTED_BEFORE_STREAMING
        finally:
            stream.end(outcome, error)
        if self.background is not None and outcome == SUCCESS:
            await self.background()
