"""A stream's life, from its first chunk to its end, and the one place its outcome is decided.

``Stream`` drives the engine client's generator for one client: it watches the
connection (a disconnect cancels the generator, whose ``finally`` frees the
slot and the engine row), decides the outcome, and hands one frozen
``Summary`` to the observers (tracing, metrics, the session, the user's
callback) exactly once. ``StreamResponse`` is the ASGI response both APIs use;
a ``Formatter`` says only how text goes on the wire.

| outcome | when |
| --- | --- |
| success | the last byte was sent |
| client_disconnected_while_streaming | the client left after the first body byte |
| client_disconnected_before_streaming | the client left while queued or before the first byte |
| unknown_error_occurred | anything else failed |
| rejected | no queue place (not admitted: no callback) |
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from starlette.responses import Response

from .engine.client import Timeline
from .errors import ChatStreamError, Rejected, from_exception

log = logging.getLogger("chatstream")

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"
REJECTED = "rejected"


@dataclass(frozen=True)
class Summary:
    """Everything observers may know about a finished stream."""
    outcome: str
    endpoint: str
    text: str
    streamed: bool                    # some of the answer reached the client
    error: BaseException | None
    timeline: Timeline
    params: object
    messages: list | None

    @property
    def admitted(self) -> bool:
        return self.timeline.reserved and self.outcome != REJECTED


class Stream:
    """One generation on its way to one client."""

    def __init__(self, chunks, timeline: Timeline, endpoint: str, params, messages,
                 on_end: Callable[[Summary], None]):
        self.chunks = chunks
        self.timeline = timeline
        self.endpoint = endpoint
        self.params = params
        self.messages = messages
        self.on_end = on_end
        self.text: list[str] = []
        self.streamed = False
        self.summary: Summary | None = None

    async def run(self, receive, on_text: Callable[[str], Awaitable[bool]]) -> tuple[str, BaseException | None]:
        """Feed text to ``on_text`` (which says whether bytes went out) until the end, a disconnect or an error.
        Returns (outcome, error); only a cancellation of the caller propagates."""

        async def pump():
            async for text in self.chunks:
                self.text.append(text)
                if await on_text(text):
                    self.streamed = True

        async def disconnected():
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({pump_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not pump_task.done():
                pump_task.cancel()
                await asyncio.gather(pump_task, return_exceptions=True)
                return (DISCONNECTED_WHILE_STREAMING if self.streamed else DISCONNECTED_BEFORE_STREAMING), None
            error = pump_task.exception()
            if error is None:
                return SUCCESS, None
            if isinstance(error, Rejected):
                return REJECTED, error
            if not isinstance(error, ChatStreamError):
                log.error("stream failed: %s", error, exc_info=error)
            return UNKNOWN_ERROR, error
        except asyncio.CancelledError:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
            gone = DISCONNECTED_WHILE_STREAMING if self.streamed else DISCONNECTED_BEFORE_STREAMING
            self.end(gone)
            raise
        finally:
            watcher.cancel()
            await self.chunks.aclose()

    def end(self, outcome: str, error: BaseException | None = None) -> Summary:
        """Called once per stream (later calls return the first summary): tell the observers."""
        if self.summary is not None:
            return self.summary
        self.summary = Summary(outcome, self.endpoint, "".join(self.text), self.streamed, error, self.timeline,
                               self.params, self.messages)
        try:
            self.on_end(self.summary)
        except Exception:
            log.exception("ending a stream failed")
        return self.summary


class Formatter:
    """How text goes on the wire: plain text deltas, streamed (``/chat_stream``)."""

    media_type = "text/plain; charset=utf-8"
    streaming = True

    def delta(self, text: str) -> bytes | None:
        return text.encode("utf-8")

    def end(self, stream: Stream) -> bytes:
        return b""

    def failed(self, error: ChatStreamError) -> bytes | None:
        """Bytes that tell the client the stream failed after it started; None: cut the connection without
        a proper end (a plain-text client sees an incomplete body, never a clean end)."""
        return None


def _start(status: int, media_type: str, headers: dict) -> dict:
    raw = [(b"content-type", media_type.encode()), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
    return {"type": "http.response.start", "status": status, "headers": raw}


class StreamResponse(Response):
    """Sends a ``Stream``: the status line goes out with the first text, so a failure (or a refusal to queue)
    before it is still a proper JSON error response."""

    def __init__(self, stream: Stream, formatter: Formatter | None = None, headers: dict | None = None):
        # A Response subclass so that frameworks pass it through untouched; it sends its own messages.
        self.status_code = 200
        self.background = None
        self.body = b""
        self.formatter = formatter or Formatter()
        self.media_type = self.formatter.media_type
        self.init_headers({})
        self.stream = stream
        self.extra_headers = headers or {}
        self._loop = asyncio.get_running_loop()

    async def __call__(self, scope, receive, send):
        stream, fmt = self.stream, self.formatter
        started = False

        async def on_text(text: str) -> bool:
            nonlocal started
            data = fmt.delta(text)
            if data is None:
                return False
            if not started:
                await send(_start(200, fmt.media_type, self.extra_headers))
                started = True
            await send({"type": "http.response.body", "body": data, "more_body": True})
            return True

        outcome, error = await stream.run(receive, on_text)
        try:
            if outcome == SUCCESS:
                body = fmt.end(stream)
                if not started:
                    await send(_start(200, fmt.media_type, self.extra_headers))
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif outcome in (UNKNOWN_ERROR, REJECTED):
                err = from_exception(error)
                if not started:
                    await err.response()(scope, receive, send)
                else:
                    tail = fmt.failed(err)
                    if tail is not None:
                        await send({"type": "http.response.body", "body": tail, "more_body": False})
                    # else: return without ending the body; the server closes the connection.
        except OSError:
            outcome = DISCONNECTED_WHILE_STREAMING if stream.streamed else DISCONNECTED_BEFORE_STREAMING
        finally:
            stream.end(outcome, error)

    def __del__(self):
        # A response built but never sent: its observers must still hear of it (the turn, the session lock).
        if self.stream.summary is None:
            try:
                self._loop.call_soon_threadsafe(self.stream.end, DISCONNECTED_BEFORE_STREAMING)
            except RuntimeError:
                pass
