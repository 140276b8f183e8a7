"""A session store in Redis, so that replicas share conversations.

Sessions are stored as JSON; a chat prompt is stored as its ``to_dict`` plus
its class's import path, and rebuilt on load.
"""

from __future__ import annotations

import importlib
import json

SESSION_TTL_SECONDS = 24 * 3600


def _encode(value):
    if hasattr(value, "to_dict") and hasattr(type(value), "from_dict"):
        cls = type(value)
        return {"__object__": f"{cls.__module__}:{cls.__qualname__}", "data": value.to_dict()}
    return value


def _decode(value):
    if isinstance(value, dict) and "__object__" in value:
        module, _, name = value["__object__"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        return cls.from_dict(value["data"])
    return value


class RedisStore:
    def __init__(self, url: str, prefix: str = "chatstream:session:", ttl: int = SESSION_TTL_SECONDS):
        import redis
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.ttl = ttl

    def load(self, session_id: str) -> dict | None:
        raw = self.client.get(self.prefix + session_id)
        if raw is None:
            return None
        return {k: _decode(v) for k, v in json.loads(raw).items()}

    def save(self, session_id: str, data: dict) -> None:
        payload = json.dumps({k: _encode(v) for k, v in data.items()})
        self.client.set(self.prefix + session_id, payload, ex=self.ttl)

    def delete(self, session_id: str) -> None:
        self.client.delete(self.prefix + session_id)
