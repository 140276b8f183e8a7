"""Admission: at most N generations at once, at most M waiting, the rest refused.

A ``Ticket`` is handed out when a request is accepted into the queue. It is
granted a slot in arrival order and must be released exactly once, whatever
happens to its request (finished, failed, abandoned while queued). ``release``
is idempotent, so every exit path may call it and no slot ever leaks.
"""

from __future__ import annotations

import asyncio
import collections


class Ticket:
    __slots__ = ("future", "granted", "released")

    def __init__(self, future: asyncio.Future):
        self.future = future
        self.granted = False
        self.released = False


class Admission:
    def __init__(self, slots: int, max_queue: int):
        if slots < 1:
            raise ValueError("num_of_concurrent_executions must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue_size must not be negative")
        self.slots = slots
        self.max_queue = max_queue
        self.processing = 0
        self._queue: collections.deque[Ticket] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def reserve(self) -> Ticket | None:
        """A ticket (granted now, or queued), or None when the queue is full."""
        ticket = Ticket(asyncio.get_running_loop().create_future())
        if self.processing < self.slots and not self._queue:
            self._grant(ticket)
        elif len(self._queue) < self.max_queue:
            self._queue.append(ticket)
        else:
            return None
        return ticket

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        self.processing += 1
        if not ticket.future.done():
            ticket.future.set_result(True)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket.granted:
            self.processing -= 1
        else:
            try:
                self._queue.remove(ticket)
            except ValueError:
                pass
            if not ticket.future.done():
                ticket.future.cancel()
        while self._queue and self.processing < self.slots:
            self._grant(self._queue.popleft())
