"""A stream's life, from its first chunk to its end, and the one place its outcome is decided.

``Stream`` drives the engine client's generator for one client: it watches the
connection (a disconnect cancels the generator, whose ``finally`` frees the
slot and the engine row), decides the outcome, and hands one frozen
``Summary`` to the observers (tracing, metrics, the session, the user's
callback) exactly once. It knows no HTTP: ``server/responses.py`` sends it
(``StreamResponse``, the ASGI response both APIs use).

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

from .errors import ChatStreamError, Rejected
from .timeline import Timeline

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
                 on_end: Callable[[Summary], None], on_complete: Callable[[str], Awaitable[None]] | None = None):
        self.chunks = chunks
        self.timeline = timeline
        self.endpoint = endpoint
        self.params = params
        self.messages = messages
        self.on_end = on_end
        self.on_complete = on_complete
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

    async def complete(self) -> None:
        """The whole answer is generated and its last message is about to go out: await ``on_complete`` (the
        session stores the turn), so that a client that saw the end finds it stored."""
        if self.on_complete is None:
            return
        try:
            await self.on_complete("".join(self.text))
        except Exception:
            log.exception("completing a stream failed")

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
