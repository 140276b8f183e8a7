"""One session as one request sees it: ``request.state.session``, with the original ChatStream methods.

Requests of one session that run at the same time on this replica share one
``_Live`` session dict. ``SessionManager`` writes it through the middleware's
bounded store calls: ``persist`` (now, if changed), ``save`` (awaited, retried
while the store is unreachable: the end of a turn), and ``save_session`` (the
original: marks it for the middleware, or saves in the background after the
request). ``on_close`` runs functions when the request ends, answered or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from .errors import SessionStoreError
from .memory_store import SessionStore

if TYPE_CHECKING:
    from .middleware import SessionMiddleware

log = logging.getLogger("chatstream.sessions")

# How long the end of a turn waits for an unreachable store to take it (Redis restarting): the client
# has the whole answer but not yet the end, so a turn it saw end is a turn that was stored.
SAVE_RETRY_SECONDS = 60.0


def is_blank(data: dict) -> bool:
    """True when a session holds nothing worth a cookie: only None, empty values or empty prompts."""
    for value in data.values():
        if value is None:
            continue
        if isinstance(value, (str, bytes, list, tuple, dict, set)) and not value:
            continue
        is_empty = getattr(value, "is_empty", None)
        if callable(is_empty):
            try:
                if is_empty():
                    continue
            except Exception:  # noqa: BLE001 - an odd value counts as content
                pass
        return False
    return True


class _Live:
    """One session as held by this replica while requests use it."""

    def __init__(self, session_id: str, data: dict, stored: bool, payload: str | None):
        self.session_id = session_id
        self.data = data
        self.stored = stored          # the store has it (loaded, or reserved for a new session)
        self.payload = payload        # what the store holds, to skip writes that change nothing
        self.users = 0
        self.lock = asyncio.Lock()    # orders this session's writes


class SessionManager:
    """What ``request.state.session`` holds for one request."""

    def __init__(self, middleware: "SessionMiddleware", live: _Live, is_new: bool, client: str | None):
        self._middleware = middleware
        self._live = live
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        self.session_id = live.session_id
        self.is_new = is_new

    @property
    def store(self) -> SessionStore:
        return self._middleware.store

    def get_session(self) -> dict:
        return self._live.data

    def save_session(self) -> None:
        """Mark the session for saving. The middleware persists it once, when the request ends;
        called after that (a late callback), it persists in the background."""
        if self._closed:
            self._persist_later()

    def clear_session(self) -> None:
        """Empty the session; the middleware deletes it from the store when the request ends."""
        self._live.data.clear()
        if self._closed:
            self._persist_later()

    async def reserve(self) -> None:
        """Make sure a new session has a place in the store now, before long work such as a stream.

        Raises ``SessionCapacityError`` (503, or ``SessionRateError`` 429) when there is none.
        The middleware calls it itself when a response starts, for apps that did not."""
        live = self._live
        if live.stored:
            return
        async with live.lock:
            if live.stored:
                return
            self._middleware._count_new_session(self._client)
            await self._middleware._store_call(self.store.reserve(live.session_id, live.data))
            live.stored = True

    async def persist(self) -> None:
        """Write the session now if it changed (the middleware calls this; apps rarely need to).

        A new session is written only when it holds something; an existing one that became
        empty is deleted."""
        live = self._live
        if is_blank(live.data):
            if live.stored:  # emptied (or reserved and never filled): nothing to keep
                async with live.lock:
                    await self._middleware._store_call(self.store.delete(live.session_id))
                    live.stored, live.payload = False, None
            return
        if not live.stored:
            if self.is_new and self._closed:
                return  # no cookie went out for it: nobody could ever use it
            await self.reserve()
        async with live.lock:
            payload = self.store.dumps(live.data)
            if payload != live.payload:
                await self._middleware._store_call(self.store.save(live.session_id, live.data, payload))
                live.payload = payload

    async def save(self) -> None:
        """Persist now, awaited: while the store is unreachable, retry for ``SAVE_RETRY_SECONDS``; then log
        what was not saved (never raises). A stream calls it before its last message: the end of a turn."""
        await self._persist_quietly(SAVE_RETRY_SECONDS)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the request ends, its response sent or not (a response built and never sent
        must still end its stream: the turn, the session's lock)."""
        self._on_close.append(fn)

    def close(self) -> None:
        """The request is over (the middleware calls this, then persists): run the close hooks; later saves
        persist in the background."""
        hooks, self._on_close = self._on_close, []
        for fn in hooks:
            try:
                fn()
            except Exception:
                log.exception("a session close hook failed")
        self._closed = True

    async def _persist_quietly(self, retry_seconds: float = 0.0) -> None:
        """Persist; while the store fails, try again for ``retry_seconds``; then log what was not saved."""
        deadline, pause = time.monotonic() + retry_seconds, 0.25
        while True:
            try:
                await self.persist()
                return
            except SessionStoreError as exc:
                if time.monotonic() + pause > deadline:
                    self._middleware._log_unsaved(exc)
                    return
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
            except Exception as exc:  # noqa: BLE001 - the response is gone; say so in the log
                self._middleware._log_unsaved(exc)
                return

    def _persist_later(self) -> None:
        def start():
            task = self._loop.create_task(self._persist_quietly())
            self._middleware._tasks.add(task)
            task.add_done_callback(self._middleware._tasks.discard)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            start()
        else:
            try:
                self._loop.call_soon_threadsafe(start)
            except RuntimeError:  # the loop is closed: the server has stopped
                log.error("session %s… was not saved: the server has stopped", self.session_id[:8])
