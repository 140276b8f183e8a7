"""HTTP sessions: a signed cookie naming a session kept in a server-side store.

By idea: ``middleware.py`` (cookie, the send wrapper, bounded store calls),
``manager.py`` (``request.state.session``), ``memory_store.py`` (the store
interface and ``MemoryStore``), ``errors.py`` (503 / 429).

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
  the response, it persists in the background). A response in one piece is
  sent once the session is persisted (a 503 if the store failed); a chat
  stream awaits ``SessionManager.save()`` before its last message, so a
  client that saw the end of a turn can rely on it being stored.
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

from .errors import SessionCapacityError, SessionError, SessionRateError, SessionStoreError
from .manager import SAVE_RETRY_SECONDS, SessionManager, is_blank
from .memory_store import MemoryStore, SessionStore
from .middleware import COOKIE_NAME, SessionMiddleware, resolve_secret

__all__ = ["COOKIE_NAME", "SAVE_RETRY_SECONDS", "MemoryStore", "SessionCapacityError", "SessionError",
           "SessionManager", "SessionMiddleware", "SessionRateError", "SessionStore", "SessionStoreError",
           "is_blank", "resolve_secret"]
