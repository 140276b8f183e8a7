"""A session store in Redis, so that replicas share conversations.

- Async (``redis.asyncio``): a slow Redis never blocks the event loop, so
  streams of other sessions keep flowing while one request waits.
- Bounded in time: connect and read timeouts (``socket_connect_timeout``,
  ``socket_timeout``, short by default), no retry on timeout, and the session
  middleware puts an overall deadline on every call; a hung Redis gives the
  request a 503 JSON error within that time.
- Sessions are JSON. A value with ``to_dict``/``from_dict`` (a chat prompt) is
  stored as ``{"__object__": "module:QualName", "data": ...}`` and rebuilt on
  load only when that name is on this store's allow-list: the project's
  prompt classes, plus classes the application registers with
  ``RedisStore(url, classes=[MyPrompt])`` or ``store.allow(MyPrompt)``.
  Nothing is ever imported because stored data names it; a value naming an
  unknown class is dropped with a warning.
- Each load slides the session's expiry (``GETEX``); a session lives ``ttl``
  seconds after its last use.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("chatstream.sessions")

SESSION_TTL_SECONDS = 24 * 3600


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def default_classes() -> list[type]:
    from . import prompt
    return [prompt.ChatPrompt]


class RedisStore:
    def __init__(self, url: str, prefix: str = "chatstream:session:", ttl: int = SESSION_TTL_SECONDS,
                 classes=(), connect_timeout: float = 1.0, timeout: float = 1.0, max_connections: int = 100):
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        # One quick retry on a broken pooled connection (Redis restarted); none on a timeout.
        self.client = Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                     retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                                     retry_on_timeout=False, max_connections=max_connections)
        self._classes: dict[str, type] = {}
        for cls in [*default_classes(), *classes]:
            self.allow(cls)
        self._getex = True

    def allow(self, cls: type) -> type:
        """Let values of ``cls`` (with ``to_dict()`` and ``from_dict()``) be stored and rebuilt."""
        if not (callable(getattr(cls, "to_dict", None)) and callable(getattr(cls, "from_dict", None))):
            raise TypeError(f"{cls!r} needs to_dict() and a from_dict() classmethod to be stored in Redis")
        self._classes[_class_name(cls)] = cls
        return cls

    # -- encoding -------------------------------------------------------------------------
    def _encode(self, value):
        if hasattr(value, "to_dict") and hasattr(type(value), "from_dict"):
            name = _class_name(type(value))
            if self._classes.get(name) is not type(value):
                raise TypeError(f"session value of class {name} cannot be stored in Redis: "
                                f"register it with RedisStore(url, classes=[...]) or store.allow(cls)")
            return {"__object__": name, "data": value.to_dict()}
        return value

    def _decode(self, key: str, value):
        if isinstance(value, dict) and "__object__" in value:
            cls = self._classes.get(value["__object__"])
            if cls is None:
                log.warning("session value %r names class %r, which is not allowed: dropped", key, value["__object__"])
                return _DROP
            try:
                return cls.from_dict(value["data"])
            except Exception as exc:  # noqa: BLE001 - stored data is not trusted
                log.warning("session value %r could not be rebuilt as %s (%s): dropped", key, value["__object__"], exc)
                return _DROP
        return value

    def dumps(self, data: dict) -> str:
        return json.dumps({k: self._encode(v) for k, v in data.items()}, separators=(",", ":"))

    def loads(self, raw: bytes) -> dict | None:
        try:
            stored = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            log.warning("a stored session is not valid JSON: ignored")
            return None
        if not isinstance(stored, dict):
            return None
        data = {k: self._decode(k, v) for k, v in stored.items()}
        return {k: v for k, v in data.items() if v is not _DROP}

    # -- the store ------------------------------------------------------------------------
    async def load(self, session_id: str) -> dict | None:
        key = self.prefix + session_id
        if self._getex:
            from redis.exceptions import ResponseError
            try:
                raw = await self.client.getex(key, ex=self.ttl)
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._getex = False  # Redis before 6.2
        if not self._getex:
            async with self.client.pipeline(transaction=False) as pipe:
                raw, _ = await pipe.get(key).expire(key, self.ttl).execute()
        return None if raw is None else self.loads(raw)

    async def reserve(self, session_id: str, data: dict) -> None:
        """Nothing to claim (Redis's own memory limit bounds it, docs/sessions.md), but ask whether Redis
        answers: a new conversation that could not be stored is refused before its stream, not held after it."""
        await self.client.ping()

    async def save(self, session_id: str, data: dict, payload: str) -> None:
        await self.client.set(self.prefix + session_id, payload, ex=self.ttl)

    async def delete(self, session_id: str) -> None:
        await self.client.delete(self.prefix + session_id)

    async def aclose(self) -> None:
        await self.client.aclose()


_DROP = object()
