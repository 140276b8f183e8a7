"""API keys: who may use the model.

With ``--api-keys-file`` (``CHATSTREAM_API_KEYS_FILE``; on Kubernetes the
Secret named by ``spec.auth.apiKeysSecretRef``, mounted as a volume) every
request needs ``Authorization: Bearer <key>`` with one of the file's keys,
except those a kubelet, a Prometheus or a browser must make without one: the
probes, ``/metrics`` and the two static pages with their script (they ask for the
key once and send it with their own calls: static/auth.js). Everything else, endpoints added later included, is
closed: a 401 in the one error shape, before any session is loaded or created.

The file holds one key per line (blank lines and ``#`` comments are skipped).
It is looked at again on every request (one ``stat``) and read again when it
changed, so that a rotated Secret takes effect without a restart: the kubelet
swaps a mounted Secret's files atomically within about a minute. A file that
becomes unreadable keeps the keys last read; one that becomes empty closes
everything (a server never opens itself up because a file changed). At start,
a missing, unreadable or empty file stops the server with the reason.

Keys are kept only as SHA-256 digests and compared with
``hmac.compare_digest`` against every key (no early exit), so the time taken
says nothing about a key's value, length or position. They are never logged,
never put in an error message, and HTTP spans never record the header
(telemetry.py redacts it even when header capture is switched on).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading

from .errors import ChatStreamError
from .server.responses import error_response

log = logging.getLogger("chatstream.auth")

# Reachable without a key: the kubelet's probes, Prometheus, and the pages that ask for the key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/", "/traces", "/auth.js"})


class ApiKeysError(Exception):
    """The keys file cannot be used at start."""


def parse(text: str) -> list[str]:
    """The keys in a file's text: one per line, blank lines and ``#`` comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeys:
    """The keys of one file, read again when the file changes."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._digests: tuple[bytes, ...] = ()
        self._signature = None
        self._problem: str | None = None
        try:
            signature = self._stat()
            digests = self._read()
        except OSError as exc:
            raise ApiKeysError(f"API keys file {path}: {exc.strerror or exc}") from None
        if not digests:
            raise ApiKeysError(f"API keys file {path} holds no key (one key per line)")
        self._digests, self._signature = digests, signature
        log.info("API keys required: %d key(s) from %s", len(digests), path)

    def _stat(self):
        st = os.stat(self.path)  # follows the kubelet's ..data symlink: a swapped Secret is a new inode
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self) -> tuple[bytes, ...]:
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            return tuple(_digest(k.encode("utf-8", "surrogateescape")) for k in parse(f.read()))

    def _warn(self, problem: str | None) -> None:
        if problem != self._problem:  # once per new problem, not once per request
            self._problem = problem
            if problem:
                log.warning("API keys file %s: %s", self.path, problem)

    def current(self) -> tuple[bytes, ...]:
        """The digests of the keys now in force (the file read again if it changed)."""
        try:
            signature = self._stat()
        except OSError as exc:
            self._warn(f"{exc.strerror or exc}; keeping the {len(self._digests)} key(s) last read")
            return self._digests
        if signature == self._signature:
            return self._digests
        with self._lock:
            if signature != self._signature:
                try:
                    digests = self._read()
                except OSError as exc:
                    self._warn(f"{exc.strerror or exc}; keeping the {len(self._digests)} key(s) last read")
                    return self._digests
                self._digests, self._signature = digests, signature
                if digests:
                    self._warn(None)
                    log.info("API keys file %s changed: %d key(s) now", self.path, len(digests))
                else:
                    self._warn("it holds no key now: every request needing a key is refused")
        return self._digests

    def allows(self, presented: str | None) -> bool:
        digests = self.current()
        if not presented:
            return False
        given = _digest(presented.encode("latin-1"))  # the header's own bytes (bearer() decoded them so)
        match = False
        for digest in digests:
            match |= hmac.compare_digest(given, digest)
        return match


def bearer(scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def unauthorized(presented: str | None) -> ChatStreamError:
    message = ("this server needs an API key: send the header Authorization: Bearer <key>" if presented is None
               else "the API key is not valid")
    return ChatStreamError(401, message, "authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """Pure ASGI: requests without a valid key end here with a 401; the rest pass untouched.

    Usable in an application's own FastAPI app too:
    ``app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(path))`` (added last, it runs first).
    """

    def __init__(self, app, keys: ApiKeys, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        presented = bearer(scope)
        if self.keys.allows(presented):
            return await self.app(scope, receive, send)
        await error_response(unauthorized(presented))(scope, receive, send)
