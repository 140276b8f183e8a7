"""One admitted generation, from the queue to its last byte.

``StreamRun`` ties a queue ticket to an engine sequence and hands the engine's
events to the event loop. ``RunResponse`` is the ASGI response that waits for
the slot, streams the run and decides the outcome. It watches the connection
itself (``receive`` yields ``http.disconnect``) so that a client leaving while
queued gives up its place at once, and one leaving mid-stream cancels its
generation at the next decoding step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

from starlette.responses import Response

from .engine.events import Delta, Failed, Finished

log = logging.getLogger("chatstream")

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"

_GONE = object()  # put in the event queue when the client disconnects


class ClientGone(Exception):
    pass


class StreamRun:
    def __init__(self, chat_stream, ticket, prompt_ids: list[int], params, on_end: Callable[["StreamRun"], None],
                 trace, has_callback: bool = False):
        self.chat_stream = chat_stream
        self.trace = trace
        self.has_callback = has_callback
        self.ticket = ticket
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_end = on_end
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.seq = None
        self.text: list[str] = []
        self.finished: Finished | None = None
        self.error: BaseException | None = None
        self.outcome: str | None = None
        self.created_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.completion_tokens = 0

    # -- lifecycle ----------------------------------------------------------------------
    async def wait_admitted(self, gone: asyncio.Future) -> bool:
        """Wait for a slot; False when the client left first."""
        if not self.ticket.future.done():
            await asyncio.wait({self.ticket.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not self.ticket.granted:
            return False
        self.admitted_at = time.monotonic()
        self.trace.admitted()
        return True

    def start(self) -> None:
        self.seq = self.chat_stream.engine.submit(self.prompt_ids, self.params, self._from_engine)

    def _from_engine(self, event) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def client_gone(self) -> None:
        self.events.put_nowait(_GONE)

    async def deltas(self):
        """Yield text as it comes (coalescing what is already there); raise ClientGone or the engine's error."""
        while True:
            event = await self.events.get()
            parts = []
            while True:
                if event is _GONE:
                    raise ClientGone()
                if isinstance(event, Delta):
                    now = time.monotonic()
                    if self.first_token_at is None:
                        self.first_token_at = now
                        self.trace.first_token()
                    self.last_token_at = now
                    self.completion_tokens = event.completion_tokens
                    self.text.append(event.text)
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    self.finished = event
                    self.completion_tokens = event.completion_tokens
                    if parts:
                        yield "".join(parts)
                    return
                elif isinstance(event, Failed):
                    raise RuntimeError(f"generation failed: {event.error}") from event.error
                if self.events.empty():
                    break
                event = self.events.get_nowait()
            if parts:
                yield "".join(parts)

    def end(self, outcome: str) -> None:
        """Called exactly once: stop the generation, free the slot, report."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self.seq is not None and self.finished is None:
            self.chat_stream.engine.cancel(self.seq)
        self.chat_stream.admission.release(self.ticket)
        try:
            self.trace.finish(self, expect_callback=self.has_callback)
            self.on_end(self)
        except Exception:
            log.exception("ending a stream failed")

    @property
    def full_text(self) -> str:
        return "".join(self.text)


async def watch_disconnect(receive, run: StreamRun) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            run.client_gone()
            return


class Formatter:
    """How a run's text goes on the wire: plain text deltas by default."""

    media_type = "text/plain; charset=utf-8"

    def delta(self, text: str) -> bytes:
        return text.encode("utf-8")

    def end(self, run: StreamRun) -> bytes:
        return b""


class RunResponse(Response):
    def __init__(self, run: StreamRun, formatter: Formatter | None = None, headers: dict | None = None):
        # A Response subclass so that frameworks pass it through untouched; it sends its own messages.
        self.status_code = 200
        self.background = None
        self.body = b""
        self.formatter = formatter or Formatter()
        self.media_type = self.formatter.media_type
        self.init_headers({})
        self.run = run
        self.extra_headers = headers or {}

    def _start(self, status: int = 200, media_type: str | None = None) -> dict:
        headers = [(b"content-type", (media_type or self.formatter.media_type).encode()),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in self.extra_headers.items()]
        return {"type": "http.response.start", "status": status, "headers": headers}

    async def __call__(self, scope, receive, send):
        run = self.run
        watcher = asyncio.ensure_future(watch_disconnect(receive, run))
        started = sent_body = False
        outcome = UNKNOWN_ERROR
        try:
            if not await run.wait_admitted(watcher):
                outcome = DISCONNECTED_BEFORE_STREAMING
                return
            run.start()
            async for text in run.deltas():
                if not started:
                    await send(self._start())
                    started = True
                await send({"type": "http.response.body", "body": self.formatter.delta(text), "more_body": True})
                sent_body = True
            if not started:
                await send(self._start())
                started = True
            await send({"type": "http.response.body", "body": self.formatter.end(run), "more_body": False})
            outcome = SUCCESS
        except ClientGone:
            outcome = DISCONNECTED_WHILE_STREAMING if sent_body else DISCONNECTED_BEFORE_STREAMING
        except asyncio.CancelledError:
            outcome = DISCONNECTED_WHILE_STREAMING if sent_body else DISCONNECTED_BEFORE_STREAMING
            raise
        except Exception as exc:
            run.error = exc
            log.exception("stream failed")
            outcome = UNKNOWN_ERROR
            if not started:
                body = json.dumps({"error": {"type": "internal_error", "message": str(exc)}}).encode()
                await send(self._start(500, "application/json"))
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            run.end(outcome)

    def __del__(self):
        # A response that was built but never sent still holds a queue ticket.
        if self.run.outcome is None:
            try:
                self.run.loop.call_soon_threadsafe(self.run.end, DISCONNECTED_BEFORE_STREAMING)
            except RuntimeError:
                pass
