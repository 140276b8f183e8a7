"""What a session can fail with: no room, too many new sessions from one address, a store that failed."""

from __future__ import annotations

import math

from ..errors import ChatStreamError


class SessionError(ChatStreamError):
    """A session could not be loaded, created or stored: a 503 (or 429) with ``Retry-After``, in the one error
    shape (``errors.ChatStreamError``); the middleware answers it itself (``server.responses.error_response``)."""

    status_code = 503
    type = "unavailable"
    code = "session_error"

    def __init__(self, message: str, retry_after: float = 1.0):
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(self.status_code, message, self.type, None, self.code,
                         {"Retry-After": str(self.retry_after)})


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
