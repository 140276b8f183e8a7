"""The engine's async face: one call, ``generate()``, an async generator of text.

``generate`` takes a queue place (or raises ``Rejected``), waits for a slot,
submits the prompt to the engine thread, and yields text as it comes. On every
exit (the end, the consumer closing it because the client left, a
cancellation, an error) its one ``finally`` cancels the engine sequence and
frees the slot, so no path can leak either. What happened is written to a
``Timeline`` (timeline.py) that the caller reads once the generator is done.
It lives above the engine package: it speaks the service's admission and errors,
which the engine knows nothing of.
"""

from __future__ import annotations

import asyncio
import time

from .admission import Admission
from .engine.events import Delta, Failed, Finished
from .errors import Rejected
from .timeline import Timeline


class EngineError(RuntimeError):
    """The generation failed on the server side (the engine reported a failure)."""


class EngineClient:
    def __init__(self, engine, admission: Admission, queue_full_status: int = 503, retry_after_seconds: int = 1):
        self.engine = engine
        self.admission = admission
        self.queue_full_status = queue_full_status
        self.retry_after_seconds = retry_after_seconds
        self.draining = False

    def _reserve(self):
        if self.draining:
            raise Rejected(503, self.retry_after_seconds, "the server is shutting down", "draining")
        ticket = self.admission.reserve()
        if ticket is None:
            raise Rejected(self.queue_full_status, self.retry_after_seconds,
                           f"all {self.admission.slots} slots are busy and the queue of {self.admission.max_queue} "
                           f"is full; retry later", "queue_full")
        return ticket

    async def generate(self, prompt_ids: list[int], params, timeline: Timeline | None = None):
        timeline = timeline if timeline is not None else Timeline(len(prompt_ids))
        ticket = self._reserve()
        timeline.reserved = True
        seq = None
        try:
            if not ticket.granted:
                await ticket.future
            timeline.admitted_at = time.monotonic()
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def on_event(event) -> None:  # engine thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass

            seq = self.engine.submit(prompt_ids, params, on_event)
            while True:
                parts, finished = [], None
                event = await events.get()
                while True:  # take what is already there: one write for several tokens
                    if isinstance(event, Delta):
                        parts.append(event.text)
                        timeline.completion_tokens = event.completion_tokens
                    elif isinstance(event, Finished):
                        finished = event
                    elif isinstance(event, Failed):
                        raise EngineError(f"generation failed: {event.error}") from event.error
                    if finished is not None or events.empty():
                        break
                    event = events.get_nowait()
                if parts:
                    now = time.monotonic()
                    timeline.first_token_at = timeline.first_token_at or now
                    timeline.last_token_at = now
                if finished is not None:
                    timeline.completion_tokens = finished.completion_tokens
                    timeline.cached_prompt_tokens = getattr(finished, "cached_prompt_tokens", 0)
                    timeline.finish_reason = finished.reason
                    seq = None  # nothing left to cancel
                if parts:
                    yield "".join(parts)
                if finished is not None:
                    return
        finally:
            if seq is not None:
                self.engine.cancel(seq)
            self.admission.release(ticket)
