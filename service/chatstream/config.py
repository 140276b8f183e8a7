"""Server settings: defaults, overridden by CHATSTREAM_* variables, overridden by CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from . import envvars
from .engine.loader import DEFAULT_MODEL


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    revision: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    cpu_linear: str = "onednn"
    threads: int = 0                  # 0: the schedulable CPUs, capped by the cgroup CPU quota
    max_concurrent: int = 8
    max_queue: int = 32
    max_new_tokens: int = 256
    context_length: int = 2048
    temperature: float = 0.7
    top_p: float = 0.9
    queue_full_status: int = 503
    session_secret: str | None = None
    session_store: str = "memory"
    redis_url: str | None = None
    shutdown_grace_seconds: float = 30.0

    ENV = {
        "model": envvars.MODEL, "revision": envvars.REVISION, "served_model_name": envvars.SERVED_MODEL_NAME,
        "host": envvars.HOST, "port": envvars.PORT, "device": envvars.DEVICE, "dtype": envvars.DTYPE,
        "cpu_linear": envvars.CPU_LINEAR, "threads": envvars.THREADS,
        "max_concurrent": envvars.MAX_CONCURRENT, "max_queue": envvars.MAX_QUEUE,
        "max_new_tokens": envvars.MAX_NEW_TOKENS, "context_length": envvars.CONTEXT_LENGTH,
        "queue_full_status": envvars.QUEUE_FULL_STATUS, "session_secret": envvars.SESSION_SECRET,
        "session_store": envvars.SESSION_STORE, "redis_url": envvars.REDIS_URL,
        "shutdown_grace_seconds": envvars.SHUTDOWN_GRACE_SECONDS,
    }

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            kind = types[name]
            try:
                values[name] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError:
                raise SystemExit(f"{var}={raw!r} is not a valid {kind}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        problems = []
        if self.max_concurrent < 1:
            problems.append("max concurrent streams must be at least 1")
        if self.max_queue < 0:
            problems.append("max queue must not be negative")
        if self.max_new_tokens < 1:
            problems.append("max new tokens must be at least 1")
        if self.context_length < 16:
            problems.append("context length must be at least 16")
        if self.queue_full_status not in (429, 503):
            problems.append("queue-full status must be 429 or 503")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"unknown device {self.device!r} (auto, cpu, cuda)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"unknown dtype {self.dtype!r} (auto, float32, bfloat16, float16)")
        if self.threads < 0:
            problems.append("threads must be 0 (automatic) or positive")
        if self.cpu_linear not in ("onednn", "torch"):
            problems.append(f"unknown CPU linear kernel {self.cpu_linear!r} (onednn, torch)")
        if self.session_store not in ("memory", "redis"):
            problems.append(f"unknown session store {self.session_store!r} (memory, redis)")
        if self.session_store == "redis" and not self.redis_url:
            problems.append("the redis session store needs a URL (CHATSTREAM_REDIS_URL)")
        if problems:
            raise SystemExit("invalid settings: " + "; ".join(problems))
