"""Every server setting in one table: name, type, default, range, environment variable, help, CRD field.

The CLI flags, the reading of ``CHATSTREAM_*`` variables, the range checks and
``ChatStream``'s library defaults are all built from ``TABLE``; a test holds it
against the CRD schema, so that any value the API server accepts starts a pod.
Precedence: defaults < environment < flags. Importing this module loads neither
torch nor fastapi (``chatstream --help`` stays fast).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import envvars

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


@dataclass(frozen=True)
class Setting:
    name: str                       # attribute of Settings; the flag is --name-with-dashes
    type: type
    default: object
    env: str | None
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    crd: str | None = None          # the ChatStreamDeployment spec field that sets it (dotted path)
    library: str | None = None      # the ChatStream(...) keyword it maps to
    library_default: object = None  # the original library's default, where it differs from the server's

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: str, source: str):
        """A value from text (an environment variable or a flag), checked against the range."""
        try:
            value = self.type(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not a valid {self.type.__name__}") from None
        self.check(value, source)
        return value

    def check(self, value, source: str | None = None) -> None:
        where = source or self.flag
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{where}: {value} is below the minimum {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{where}: {value} is above the maximum {self.maximum:g}")


S = Setting
TABLE: tuple[Setting, ...] = (
    S("model", str, DEFAULT_MODEL, envvars.MODEL,
      "model source: builtin:smollm2-135m-instruct, hf:ORG/NAME[@revision], a model directory or a .gguf file",
      crd="model.source"),
    S("revision", str, None, envvars.REVISION, "hub revision for hf: sources", crd="model.revision"),
    S("served_model_name", str, None, envvars.SERVED_MODEL_NAME, "model name reported by /v1/models"),
    S("host", str, "127.0.0.1", envvars.HOST, "address to listen on"),
    S("port", int, 8000, envvars.PORT, "port to listen on", minimum=1, maximum=65535),
    S("device", str, "auto", envvars.DEVICE, "auto (CUDA when present), cpu, cuda or cuda:N", crd="model.device"),
    S("dtype", str, "auto", envvars.DTYPE, "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
      choices=("auto", "float32", "bfloat16", "float16"), crd="model.dtype"),
    S("cpu_linear", str, "auto", envvars.CPU_LINEAR,
      "linear layers on the CPU: auto (time both kernels on the model at start, serve with the faster), "
      "onednn (weights prepacked once), torch (PyTorch's own kernel) or bfloat16 (a float32 model's products "
      "in bfloat16 with batch-invariant attention where this CPU passes the check at start, else auto) or "
      "int8 (bfloat16 with the weights, keys and values in int8 where the CPU has AMX: half the bytes a decode "
      "step reads)",
      choices=("auto", "onednn", "torch", "bfloat16", "int8"), library="cpu_linear"),
    S("kv_cache_dtype", str, "auto", envvars.KV_CACHE_DTYPE,
      "what the KV cache holds in the bfloat16 and int8 modes of --cpu-linear: auto (int8 with int8 weights, "
      "else bfloat16), bfloat16, or int8 (a scale per position and head: half bfloat16's bytes, answers part "
      "from float32's sooner); float32 serving keeps the model's dtype",
      choices=("auto", "bfloat16", "int8"), library="kv_cache_dtype"),
    S("threads", int, 0, envvars.THREADS,
      "CPU threads for the model; 0 uses the schedulable CPUs, capped by the container's CPU limit", minimum=0),
    S("max_concurrent", int, 8, envvars.MAX_CONCURRENT,
      "generations decoding at once (the original's num_of_concurrent_executions)", minimum=1, maximum=256,
      crd="concurrency.maxConcurrentStreams", library="num_of_concurrent_executions", library_default=2),
    S("max_queue", int, 32, envvars.MAX_QUEUE,
      "requests allowed to wait for a slot (max_queue_size); beyond it the server answers 503 with Retry-After",
      minimum=0, maximum=10_000, crd="concurrency.maxQueueSize", library="max_queue_size", library_default=5),
    S("max_new_tokens", int, 256, envvars.MAX_NEW_TOKENS, "most tokens generated per answer (also caps /v1 max_tokens)",
      minimum=1, maximum=32_768, crd="generation.maxNewTokens", library="max_new_tokens"),
    S("context_length", int, 2048, envvars.CONTEXT_LENGTH,
      "tokens of prompt plus answer; the oldest turns are left out of the prompt to fit (see --window-keep)",
      minimum=64, maximum=131_072, crd="generation.contextLength", library="context_len", library_default=1024),
    S("prefix_cache_tokens", int, 4096, envvars.PREFIX_CACHE_TOKENS,
      "prompt tokens of finished turns whose KV cache is kept, so that a conversation's next turn prefills only "
      "what is new; least recently used first out; 0 turns it off", minimum=0, maximum=1_048_576,
      crd="generation.prefixCacheTokens", library="prefix_cache_tokens"),
    S("window_keep", float, 0.25, envvars.WINDOW_KEEP,
      "when a session's conversation outgrows the prompt, the oldest turns are left out until the newest fill at "
      "most this share of it, so that the next turns extend the cached prompt instead of prefilling it all again; "
      "1 leaves out one turn at a time", minimum=0.0, maximum=1.0, crd="generation.windowKeep",
      library="window_keep"),
    S("temperature", float, 0.7, envvars.TEMPERATURE, "default sampling temperature; 0 is greedy",
      minimum=0.0, maximum=2.0, library="temperature", library_default=1.0),
    S("top_p", float, 0.9, envvars.TOP_P, "default nucleus sampling threshold", minimum=0.01, maximum=1.0,
      library="top_p", library_default=1.0),
    S("queue_full_status", int, 503, envvars.QUEUE_FULL_STATUS, "status when the queue is full", choices=(429, 503)),
    S("session_secret", str, None, envvars.SESSION_SECRET,
      "secret signing session cookies (random per process when unset: sessions then die with the process)"),
    S("session_store", str, "memory", envvars.SESSION_STORE, "where sessions live", choices=("memory", "redis"),
      crd="sessions.store"),
    S("redis_url", str, None, envvars.REDIS_URL, "Redis URL for the redis session store"),
    S("shutdown_grace_seconds", float, 30.0, envvars.SHUTDOWN_GRACE_SECONDS,
      "how long SIGTERM waits for streams in flight and their callbacks", minimum=0.0, maximum=3600.0,
      crd="shutdownGraceSeconds"),
    S("traces_api", str, "on", envvars.TRACES_API,
      "serve recent traces at /traces and /api/traces (off hides them)", choices=("on", "off")),
    S("api_keys_file", str, None, envvars.API_KEYS_FILE,
      "file of API keys, one per line (a mounted Secret): when set, every endpoint except the probes, /metrics "
      "and the pages needs Authorization: Bearer <key>; a changed file takes effect without a restart",
      crd="auth.apiKeysSecretRef"),
)
del S

BY_NAME = {s.name: s for s in TABLE}


class Settings:
    """Resolved values, one attribute per row of ``TABLE``."""

    def __init__(self, **values):
        unknown = set(values) - set(BY_NAME)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for setting in TABLE:
            setattr(self, setting.name, values.get(setting.name, setting.default))

    def __repr__(self) -> str:
        shown = ", ".join(f"{s.name}={getattr(self, s.name)!r}" for s in TABLE if s.name != "session_secret")
        return f"Settings({shown})"

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        """Defaults, then ``CHATSTREAM_*`` variables, then non-None ``overrides`` (flags). Raises SystemExit
        with every problem found, so that a pod with a bad value says why in its termination message."""
        environ = os.environ if environ is None else environ
        values, problems = {}, []
        for setting in TABLE:
            raw = environ.get(setting.env) if setting.env else None
            if raw:
                try:
                    values[setting.name] = setting.parse(raw, setting.env)
                except ValueError as exc:
                    problems.append(str(exc))
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        problems += settings.problems()
        if problems:
            raise SystemExit("invalid settings: " + "; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        out = []
        for setting in TABLE:
            try:
                setting.check(getattr(self, setting.name))
            except ValueError as exc:
                out.append(str(exc))
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            out.append(f"--device: unknown device {self.device!r} (auto, cpu, cuda, cuda:N)")
        if self.session_store == "redis" and not self.redis_url:
            out.append(f"the redis session store needs a URL ({envvars.REDIS_URL})")
        return out


def library_default(name: str):
    """The default ``ChatStream(...)`` uses for a keyword (the original library's where it had one)."""
    setting = next(s for s in TABLE if s.library == name)
    return setting.default if setting.library_default is None else setting.library_default
