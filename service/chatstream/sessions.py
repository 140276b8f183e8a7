"""HTTP sessions: a signed cookie naming a session kept in a server-side store.

The cookie carries only a session id signed with the configured secret (from
``CHATSTREAM_SESSION_SECRET`` or, when unset, a random per-process secret with
a warning). The session lives in a store: ``MemoryStore`` (this process,
bounded) or ``RedisStore`` (shared by replicas, see redis_store.py).

``request.state.session`` is a ``SessionManager`` with the original ChatStream
methods ``get_session()``, ``save_session()`` and ``clear_session()``.

Rules (docs/sessions.md says why):

- A session is stored, and its cookie set, only when a request leaves
  something in it: a request that leaves it empty (``{}``, or only empty
  values such as ``{"generation_params": {}}``) creates nothing.
- The middleware persists a session once, at the end of the request, and only
  when its content changed; ``save_session()`` just marks it for that (after
  the response, it persists in the background). The end of a response is
  sent once the session is persisted, so a client that saw the end can rely
  on it; a response in one piece becomes a 503 if the store failed.
- Requests of one session that run at the same time on this replica share one
  session dict, as with the original in-process store.
- A new session needs room: ``MemoryStore`` never evicts a session used in the
  last ``evictable_after_seconds`` to make room for a new one; it refuses the
  new one with ``SessionCapacityError`` (503 + Retry-After) instead. An
  optional per-client-address rate of new sessions bounds what one address
  can take.
- Store errors and timeouts answer 503 with the JSON error shape; they never
  block the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import secrets
import threading
import time
from http.cookies import SimpleCookie
from typing import Protocol

from itsdangerous import BadSignature, TimestampSigner

from .errors import ChatStreamError

log = logging.getLogger("chatstream.sessions")

COOKIE_NAME = "chatstream_session"
END_HOLD_SECONDS = 0.5  # how long a streamed response's end may wait for the app to finish its session
# How long the end of a stream waits for an unreachable store to take its turn (Redis restarting): the
# client has the whole answer but not yet the end, so a turn it saw end is a turn that was stored.
SAVE_RETRY_SECONDS = 60.0


# -- errors ---------------------------------------------------------------------------------
class SessionError(ChatStreamError):
    """A session could not be loaded, created or stored: a 503 (or 429) with ``Retry-After``, in the one error
    shape (``errors.ChatStreamError``); ``send`` answers it from the middleware itself (pure ASGI)."""

    status_code = 503
    type = "unavailable"
    code = "session_error"

    def __init__(self, message: str, retry_after: float = 1.0):
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(self.status_code, message, self.type, None, self.code,
                         {"Retry-After": str(self.retry_after)})

    async def send(self, send) -> None:
        body = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class SessionCapacityError(SessionError):
    """No room for a new session right now (store full of recently used sessions)."""

    code = "session_capacity"


class SessionRateError(SessionCapacityError):
    """This client address created too many sessions in the last minute."""

    status_code = 429
    type = "too_many_requests"
    code = "session_rate_limited"


class SessionStoreError(SessionError):
    """The store failed or did not answer in time."""

    code = "session_store_unavailable"


class _RateLog:
    """One log line per ``every`` seconds with a count, so that a flood or an outage does not flood the log."""

    def __init__(self, level: int, what: str, every: float = 10.0):
        self.level, self.what, self.every = level, what, every
        self.count, self.logged_at = 0, -1e9

    def __call__(self, exc: Exception) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= self.every:
            log.log(self.level, "%d %s since the last report; latest: %s", self.count, self.what, exc)
            self.count, self.logged_at = 0, now


# -- stores ---------------------------------------------------------------------------------
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


# -- per request ------------------------------------------------------------------------------
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


def resolve_secret(secret: str | None) -> str:
    if secret:
        return secret
    log.warning("no session secret configured (CHATSTREAM_SESSION_SECRET): using a random one; "
                "sessions will not survive a restart or be shared between replicas")
    return secrets.token_urlsafe(32)


class SessionMiddleware:
    """Pure ASGI middleware (it never wraps ``receive``, so disconnects stay visible).

    ``new_sessions_per_client_per_minute`` (off when None) caps the sessions one client
    address may create per minute (429 beyond). Behind a proxy, the address is the proxy's
    unless the server trusts forwarded headers (uvicorn ``--forwarded-allow-ips``).
    ``store_timeout`` bounds every store call (load, reserve, save, delete) in seconds.
    """

    def __init__(self, app, secret_key: str | None = None, store: SessionStore | None = None,
                 cookie_name: str = COOKIE_NAME, max_age: int = 14 * 24 * 3600, same_site: str = "lax",
                 https_only: bool = False, new_sessions_per_client_per_minute: int | None = None,
                 store_timeout: float = 2.0):
        self.app = app
        self.signer = TimestampSigner(resolve_secret(secret_key))
        self.store = store if store is not None else MemoryStore()
        self.cookie_name = cookie_name
        self.max_age = max_age
        self.same_site = same_site
        self.https_only = https_only
        self.new_sessions_per_client_per_minute = new_sessions_per_client_per_minute
        self.store_timeout = store_timeout
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task] = set()
        self._rate_minute = -1
        self._rate_counts: dict[str, int] = {}
        self._log_refusal = _RateLog(logging.WARNING, "request(s) refused by the session middleware")
        self._log_unsaved = _RateLog(logging.ERROR, "session(s) not saved after their response")

    # -- pieces ---------------------------------------------------------------------------
    def _session_id(self, scope) -> str | None:
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                cookie = SimpleCookie()
                try:
                    cookie.load(value.decode("latin-1"))
                except Exception:
                    continue
                if self.cookie_name in cookie:
                    try:
                        return self.signer.unsign(cookie[self.cookie_name].value, max_age=self.max_age).decode()
                    except (BadSignature, UnicodeDecodeError):
                        return None
        return None

    async def _store_call(self, awaitable):
        """Every store call: bounded in time, failures as SessionStoreError (capacity errors pass)."""
        try:
            async with asyncio.timeout(self.store_timeout):
                return await awaitable
        except SessionError:
            raise
        except TimeoutError:
            raise SessionStoreError(f"the session store did not answer within {self.store_timeout:g} s") from None
        except Exception as exc:  # noqa: BLE001 - network, protocol, decoding: the store is unusable now
            raise SessionStoreError(f"the session store failed: {type(exc).__name__}: {exc}") from exc

    def _count_new_session(self, client: str | None) -> None:
        limit = self.new_sessions_per_client_per_minute
        if limit is None or client is None:
            return
        minute = int(time.monotonic() // 60)
        if minute != self._rate_minute:
            self._rate_minute, self._rate_counts = minute, {}
        count = self._rate_counts.get(client, 0)
        if count >= limit:
            raise SessionRateError(f"this address created {limit} sessions in the last minute; retry later",
                                   retry_after=60 - time.monotonic() % 60)
        if len(self._rate_counts) < 1_000_000 or client in self._rate_counts:  # bounded memory
            self._rate_counts[client] = count + 1

    async def _open(self, session_id: str | None) -> tuple[_Live, bool]:
        if session_id is not None:
            live = self._live.get(session_id)
            if live is None:
                data = await self._store_call(self.store.load(session_id))
                live = self._live.get(session_id)  # another request may have loaded it meanwhile
                if live is None and data is not None:
                    live = self._live[session_id] = _Live(session_id, data, True, self.store.dumps(data))
            if live is not None:
                live.users += 1
                return live, False
        session_id = secrets.token_urlsafe(24)
        live = self._live[session_id] = _Live(session_id, {}, False, None)
        live.users += 1
        return live, True

    def _release(self, live: _Live) -> None:
        live.users -= 1
        if live.users <= 0 and self._live.get(live.session_id) is live:
            del self._live[live.session_id]

    def _cookie(self, session_id: str) -> tuple[bytes, bytes]:
        signed = self.signer.sign(session_id).decode()
        attrs = f"{self.cookie_name}={signed}; Path=/; Max-Age={self.max_age}; HttpOnly; SameSite={self.same_site}"
        if self.https_only:
            attrs += "; Secure"
        return b"set-cookie", attrs.encode("latin-1")

    # -- the request ----------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            live, is_new = await self._open(self._session_id(scope))
        except SessionError as exc:
            self._log_refusal(exc)
            await exc.send(send)
            return
        client = scope.get("client")
        manager = SessionManager(self, live, is_new, client[0] if client else None)
        scope.setdefault("state", {})["session"] = manager
        held_start = None     # the response start, held until we know how the body comes
        started = False       # the response start went out
        streamed = False      # the body comes in several messages
        held_end = None       # a streamed response's last message, held until the session is stored
        end_task = None       # flushes held_end if the app does not return soon after it
        end_timer = None
        refused = False       # we answered with an error instead of the app's response
        loop = asyncio.get_running_loop()

        async def flush_end():
            nonlocal held_end
            message, held_end = held_end, None
            if message is not None:
                await manager._persist_quietly(SAVE_RETRY_SECONDS)
                await send(message)

        def flush_end_soon():
            nonlocal end_task
            if held_end is not None and end_task is None:
                end_task = loop.create_task(flush_end())

        async def send_with_session(message):
            nonlocal held_start, started, streamed, held_end, refused, end_timer
            if refused:
                return  # the app's response was replaced; drop the rest of it
            kind = message["type"]
            if kind == "http.response.start":
                held_start = message
                return
            if held_start is not None:
                start, held_start = held_start, None
                in_one_piece = kind == "http.response.body" and not message.get("more_body", False)
                try:
                    if in_one_piece:
                        await manager.persist()
                    elif not is_blank(live.data):
                        await manager.reserve()
                except SessionError as exc:
                    refused = True
                    self._log_refusal(exc)
                    await exc.send(send)
                    return
                if is_new and live.stored:
                    start = {**start, "headers": [*start.get("headers", []), self._cookie(manager.session_id)]}
                started = True
                await send(start)
                streamed = not in_one_piece
                if in_one_piece:
                    await send(message)
                    return
            if streamed and kind == "http.response.body" and not message.get("more_body", False):
                # The app usually records the turn just after its last message (a stream's on_end):
                # end the response once that is stored, so that a client that saw the end can rely on it.
                held_end = message
                end_timer = loop.call_later(END_HOLD_SECONDS, flush_end_soon)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_with_session)
        except SessionError as exc:  # e.g. an app's own ``await session.reserve()``
            if started:
                raise
            if refused:
                return  # already answered
            held_start = None
            self._log_refusal(exc)
            await exc.send(send)
        except BaseException:
            held_start = None  # the server's error handler answers instead
            raise
        finally:
            manager._closed = True
            if end_timer is not None:
                end_timer.cancel()
            try:
                if held_start is not None:  # a start with no body: finish it as the server would
                    await send_with_session({"type": "http.response.body", "body": b"", "more_body": False})
                if not refused:
                    await manager._persist_quietly(SAVE_RETRY_SECONDS if streamed else 0.0)
                if end_task is not None:
                    await end_task
                if held_end is not None:
                    message, held_end = held_end, None
                    await send(message)
            finally:
                self._release(live)
