"""HTTP sessions: a signed cookie naming a session kept in a server-side store.

The cookie carries only a session id signed with the configured secret (the
original hard-coded its secret; here it comes from ``CHATSTREAM_SESSION_SECRET``
or, when unset, a random per-process secret with a warning). The session itself
lives in a store: ``MemoryStore`` (bounded in size and idle age) or any object
with the ``SessionStore`` methods, so that a shared store can replace it.

``request.state.session`` is a ``SessionManager`` with the original's
``get_session()`` / ``save_session()`` methods.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from http.cookies import SimpleCookie
from typing import Protocol

from itsdangerous import BadSignature, TimestampSigner

log = logging.getLogger("chatstream.sessions")

COOKIE_NAME = "chatstream_session"


class SessionStore(Protocol):
    def load(self, session_id: str) -> dict | None: ...
    def save(self, session_id: str, data: dict) -> None: ...
    def delete(self, session_id: str) -> None: ...


class MemoryStore:
    """Sessions in this process, least recently used evicted first."""

    def __init__(self, max_sessions: int = 10_000, max_idle_seconds: float = 24 * 3600):
        self.max_sessions = max_sessions
        self.max_idle_seconds = max_idle_seconds
        self._data: collections.OrderedDict[str, tuple[float, dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def load(self, session_id: str) -> dict | None:
        with self._lock:
            entry = self._data.get(session_id)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self.max_idle_seconds:
                del self._data[session_id]
                return None
            self._data.move_to_end(session_id)
            return entry[1]

    def save(self, session_id: str, data: dict) -> None:
        with self._lock:
            self._data[session_id] = (time.monotonic(), data)
            self._data.move_to_end(session_id)
            now = time.monotonic()
            while self._data:
                oldest_id, (seen, _) = next(iter(self._data.items()))
                if len(self._data) > self.max_sessions or now - seen > self.max_idle_seconds:
                    del self._data[oldest_id]
                else:
                    break

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._data.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._data)


class SessionManager:
    """What ``request.state.session`` holds for one request."""

    def __init__(self, store: SessionStore, session_id: str, data: dict | None):
        self.store = store
        self.session_id = session_id
        self.is_new = data is None
        self._data = data if data is not None else {}

    def get_session(self) -> dict:
        return self._data

    def save_session(self) -> None:
        self.store.save(self.session_id, self._data)

    def clear_session(self) -> None:
        self._data.clear()
        self.store.delete(self.session_id)


def resolve_secret(secret: str | None) -> str:
    if secret:
        return secret
    log.warning("no session secret configured (CHATSTREAM_SESSION_SECRET): using a random one; "
                "sessions will not survive a restart or be shared between replicas")
    return secrets.token_urlsafe(32)


class SessionMiddleware:
    """Pure ASGI middleware (it never wraps ``receive``, so disconnects stay visible)."""

    def __init__(self, app, secret_key: str | None = None, store: SessionStore | None = None,
                 cookie_name: str = COOKIE_NAME, max_age: int = 14 * 24 * 3600, same_site: str = "lax",
                 https_only: bool = False):
        self.app = app
        self.signer = TimestampSigner(resolve_secret(secret_key))
        self.store = store if store is not None else MemoryStore()
        self.cookie_name = cookie_name
        self.max_age = max_age
        self.same_site = same_site
        self.https_only = https_only

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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session_id = self._session_id(scope)
        data = self.store.load(session_id) if session_id else None
        if data is None:
            session_id = secrets.token_urlsafe(24)
        manager = SessionManager(self.store, session_id, data)
        scope.setdefault("state", {})["session"] = manager

        async def send_with_cookie(message):
            if message["type"] == "http.response.start" and manager.is_new and manager.get_session():
                signed = self.signer.sign(session_id).decode()
                attrs = f"{self.cookie_name}={signed}; Path=/; Max-Age={self.max_age}; HttpOnly; SameSite={self.same_site}"
                if self.https_only:
                    attrs += "; Secure"
                message.setdefault("headers", []).append((b"set-cookie", attrs.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_cookie)
        finally:
            if manager.get_session() or not manager.is_new:
                manager.save_session()
