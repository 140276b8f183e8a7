"""One reconcile at a time per resource, however many events ask for it.

Every event about a ChatStreamDeployment or one of its children only says
"look at this resource again" (level-triggered: what happened does not
matter, what is there now does). Events arriving while that resource's
reconcile runs are folded into one more run after it, so a burst of pod and
Deployment events costs two reconciles, not twenty, and two reconciles of
the same resource never overlap (no stale status written last). A run that
fails asks for a retry after a delay; any event before then runs it sooner.
This is controller-runtime's work queue, in the size this operator needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable


class WorkQueue:
    def __init__(self, work: Callable[[Hashable], Awaitable[float | None]]):
        """work(key) reconciles one resource and returns None when done, or
        the delay in seconds after which it wants to run again."""
        self._work = work
        self._running: dict[Hashable, asyncio.Task] = {}
        self._dirty: set[Hashable] = set()
        self._retries: dict[Hashable, asyncio.TimerHandle] = {}

    def trigger(self, key: Hashable) -> None:
        """Reconcile `key` now, or once more after the run in progress."""
        if key in self._running:
            self._dirty.add(key)
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._run(key), name=f"reconcile {key}")

    def forget(self, key: Hashable) -> None:
        """The resource is gone: drop its pending retry."""
        handle = self._retries.pop(key, None)
        if handle is not None:
            handle.cancel()

    def busy(self) -> bool:
        return bool(self._running)

    async def _run(self, key: Hashable) -> None:
        try:
            while True:
                self._dirty.discard(key)
                self.forget(key)  # this run covers any retry that was due
                retry = await self._work(key)
                if retry is not None:
                    loop = asyncio.get_running_loop()
                    self._retries[key] = loop.call_later(retry, self._retry, key)
                if key not in self._dirty:
                    return
        finally:
            del self._running[key]

    def _retry(self, key: Hashable) -> None:
        self._retries.pop(key, None)
        self.trigger(key)

    async def drain(self) -> None:
        """Wait for the runs in progress (tests, shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)
