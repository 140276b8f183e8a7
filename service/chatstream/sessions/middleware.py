"""The session middleware: a signed cookie naming a session in a store, one send wrapper per request.

Pure ASGI (it never wraps ``receive``, so disconnects stay visible). The
cookie carries only a session id signed with the configured secret (from
``CHATSTREAM_SESSION_SECRET`` or, when unset, a random per-process secret
with a warning). The response start is held until the first body message:
a response in one piece goes out once its session is persisted (a 503 if the
store failed); a streamed one once a new session that holds something has its
place in the store. The session is persisted once more when the request ends,
if it changed; the end of a chat turn is saved before the stream's last
message by the stream itself (``SessionManager.save``, awaited).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from http.cookies import SimpleCookie

from itsdangerous import BadSignature, TimestampSigner

from ..server.responses import error_response
from .errors import SessionError, SessionRateError, SessionStoreError
from .manager import SAVE_RETRY_SECONDS, SessionManager, _Live, is_blank
from .memory_store import MemoryStore, SessionStore

log = logging.getLogger("chatstream.sessions")

COOKIE_NAME = "chatstream_session"


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
    async def _refuse(self, exc: SessionError, scope, receive, send) -> None:
        self._log_refusal(exc)
        await error_response(exc)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            live, is_new = await self._open(self._session_id(scope))
        except SessionError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        client = scope.get("client")
        manager = SessionManager(self, live, is_new, client[0] if client else None)
        scope.setdefault("state", {})["session"] = manager
        response = _Response(self, manager, is_new, scope, receive, send)
        try:
            await self.app(scope, receive, response.send)
        except SessionError as exc:  # e.g. an app's own ``await session.reserve()``
            if response.started:
                raise
            if not response.refused:
                response.held_start = None
                await self._refuse(exc, scope, receive, send)
        except BaseException:
            response.held_start = None  # the server's error handler answers instead
            raise
        finally:
            manager.close()
            try:
                if response.held_start is not None:  # a start with no body: finish it as the server would
                    await response.send({"type": "http.response.body", "body": b"", "more_body": False})
                if not response.refused:
                    await manager._persist_quietly(SAVE_RETRY_SECONDS if response.streamed else 0.0)
            finally:
                self._release(live)


class _Response:
    """The send wrapper of one request: holds the response start until the first body message says how the
    body comes, then stores the session as that needs and adds the cookie of a new one."""

    def __init__(self, middleware: SessionMiddleware, manager: SessionManager, is_new: bool, scope, receive, send):
        self.middleware, self.manager, self.is_new = middleware, manager, is_new
        self.scope, self.receive, self._send = scope, receive, send
        self.held_start = None  # the response start, held until we know how the body comes
        self.started = False    # the response start went out
        self.streamed = False   # the body comes in several messages
        self.refused = False    # an error answered instead of the app's response

    async def send(self, message) -> None:
        if self.refused:
            return  # the app's response was replaced; drop the rest of it
        if message["type"] == "http.response.start":
            self.held_start = message
            return
        if self.held_start is None:
            await self._send(message)
            return
        start, self.held_start = self.held_start, None
        in_one_piece = message["type"] == "http.response.body" and not message.get("more_body", False)
        manager = self.manager
        try:
            if in_one_piece:
                await manager.persist()
            elif not is_blank(manager.get_session()):
                await manager.reserve()
        except SessionError as exc:
            self.refused = True
            await self.middleware._refuse(exc, self.scope, self.receive, self._send)
            return
        if self.is_new and manager._live.stored:
            start = {**start, "headers": [*start.get("headers", []), self.middleware._cookie(manager.session_id)]}
        self.started = True
        self.streamed = not in_one_piece
        await self._send(start)
        await self._send(message)
