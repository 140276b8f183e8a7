"""Where sessions live: the store interface, and ``MemoryStore`` (this process, bounded).

``RedisStore`` (redis_store.py) is the store replicas share.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Protocol

from .errors import SessionCapacityError


class SessionStore(Protocol):
    async def load(self, session_id: str) -> dict | None: ...
    async def reserve(self, session_id: str, data: dict) -> None: ...  # may raise SessionCapacityError
    async def save(self, session_id: str, data: dict, payload: str) -> None: ...
    async def delete(self, session_id: str) -> None: ...
    def dumps(self, data: dict) -> str: ...


def _plain(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return repr(value)


class MemoryStore:
    """Sessions in this process, bounded in number, bytes and idle age.

    - A session idle for ``max_idle_seconds`` expires.
    - When ``max_sessions`` or ``max_bytes`` (JSON size of the sessions, an
      estimate of their memory) is reached, a NEW session may evict only the
      least recently used session, and only when that one has been idle for at
      least ``evictable_after_seconds``; otherwise the new session is refused
      with ``SessionCapacityError`` (Retry-After: when the oldest becomes
      evictable). Sessions of users seen recently are never evicted for
      newcomers, however many arrive.
    - Existing sessions always save (a live conversation is never refused);
      if they grow the store past ``max_bytes`` it evicts evictable sessions.
    """

    def __init__(self, max_sessions: int = 10_000, max_idle_seconds: float = 24 * 3600,
                 max_bytes: int = 256 * 1024 * 1024, evictable_after_seconds: float = 15 * 60):
        self.max_sessions = max_sessions
        self.max_idle_seconds = max_idle_seconds
        self.max_bytes = max_bytes
        self.evictable_after_seconds = evictable_after_seconds
        # session id -> [last used (monotonic), data, size in bytes]; least recently used first
        self._data: collections.OrderedDict[str, list] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # sessions may be touched from callbacks on other threads

    def dumps(self, data: dict) -> str:
        try:
            return json.dumps(data, default=_plain, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            return repr(data)

    async def load(self, session_id: str) -> dict | None:
        with self._lock:
            entry = self._data.get(session_id)
            if entry is None:
                return None
            now = time.monotonic()
            if now - entry[0] > self.max_idle_seconds:
                self._remove(session_id)
                return None
            entry[0] = now
            self._data.move_to_end(session_id)
            return entry[1]

    async def reserve(self, session_id: str, data: dict) -> None:
        with self._lock:
            if session_id in self._data:
                return
            now = time.monotonic()
            self._expire(now)
            while self._data and (len(self._data) >= self.max_sessions or self._bytes >= self.max_bytes):
                oldest_id, (seen, _, _) = next(iter(self._data.items()))
                idle = now - seen
                if idle < self.evictable_after_seconds:
                    raise SessionCapacityError(
                        f"the session store is full ({len(self._data)} sessions, {self._bytes} bytes) of "
                        f"sessions used in the last {self.evictable_after_seconds:g} s; retry later",
                        retry_after=self.evictable_after_seconds - idle)
                self._remove(oldest_id)
            if self.max_sessions <= 0:
                raise SessionCapacityError("the session store holds no sessions")
            self._data[session_id] = [now, data, 0]

    async def save(self, session_id: str, data: dict, payload: str) -> None:
        size = len(payload)
        with self._lock:
            now = time.monotonic()
            entry = self._data.get(session_id)
            if entry is None:  # expired meanwhile: an existing user, so never refused
                entry = self._data[session_id] = [now, data, 0]
            self._bytes += size - entry[2]
            entry[0], entry[1], entry[2] = now, data, size
            self._data.move_to_end(session_id)
            self._expire(now)
            while self._bytes > self.max_bytes:
                oldest_id, (seen, _, _) = next(iter(self._data.items()))
                if oldest_id == session_id or now - seen < self.evictable_after_seconds:
                    break
                self._remove(oldest_id)

    async def delete(self, session_id: str) -> None:
        with self._lock:
            self._remove(session_id)

    def _remove(self, session_id: str) -> None:
        entry = self._data.pop(session_id, None)
        if entry is not None:
            self._bytes -= entry[2]

    def _expire(self, now: float) -> None:
        while self._data:
            oldest_id, (seen, _, _) = next(iter(self._data.items()))
            if now - seen <= self.max_idle_seconds:
                break
            self._remove(oldest_id)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._data
