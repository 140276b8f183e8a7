"""Names of the environment variables the service reads.

This module is the one place those names live. The operator imports it to set
them on pods, so it must stay free of heavy imports (no torch, no fastapi).
Standard OpenTelemetry settings use the ``OTEL_*`` names of the SDK itself.
"""

MODEL = "CHATSTREAM_MODEL"                      # builtin:smollm2-135m-instruct | hf:ORG/NAME[@rev] | /path
REVISION = "CHATSTREAM_REVISION"                # hub revision (overrides an @rev in MODEL)
SERVED_MODEL_NAME = "CHATSTREAM_SERVED_MODEL_NAME"
HOST = "CHATSTREAM_HOST"
PORT = "CHATSTREAM_PORT"
DEVICE = "CHATSTREAM_DEVICE"                    # auto | cpu | cuda
DTYPE = "CHATSTREAM_DTYPE"                      # auto | float32 | bfloat16 | float16
CPU_LINEAR = "CHATSTREAM_CPU_LINEAR"            # onednn (prepacked weights) | torch
KV_CACHE_DTYPE = "CHATSTREAM_KV_CACHE_DTYPE"    # auto | bfloat16 | int8 (the bfloat16 and int8 modes)
THREADS = "CHATSTREAM_THREADS"                  # model threads; 0 = from the CPU limit, else the request (threads.py)
CPU_REQUEST = "CHATSTREAM_CPU_REQUEST"          # the pod's CPU request in millicores (the operator: downward API)
MAX_CONCURRENT = "CHATSTREAM_MAX_CONCURRENT"    # num_of_concurrent_executions
MAX_QUEUE = "CHATSTREAM_MAX_QUEUE"              # max_queue_size
MAX_NEW_TOKENS = "CHATSTREAM_MAX_NEW_TOKENS"
CONTEXT_LENGTH = "CHATSTREAM_CONTEXT_LENGTH"
QUEUE_FULL_STATUS = "CHATSTREAM_QUEUE_FULL_STATUS"  # 503 (default) or 429
TEMPERATURE = "CHATSTREAM_TEMPERATURE"        # default sampling temperature
TOP_P = "CHATSTREAM_TOP_P"                    # default nucleus threshold
PREFIX_CACHE_TOKENS = "CHATSTREAM_PREFIX_CACHE_TOKENS"  # KV of finished turns kept for reuse; 0 = off
WINDOW_KEEP = "CHATSTREAM_WINDOW_KEEP"          # share of the prompt a full conversation keeps after a jump
SESSION_SECRET = "CHATSTREAM_SESSION_SECRET"
SESSION_STORE = "CHATSTREAM_SESSION_STORE"      # memory | redis
REDIS_URL = "CHATSTREAM_REDIS_URL"
CACHE_DIR = "CHATSTREAM_CACHE_DIR"              # converted models live here
SHUTDOWN_GRACE_SECONDS = "CHATSTREAM_SHUTDOWN_GRACE_SECONDS"
TRACES_KEEP = "CHATSTREAM_TRACES_KEEP"          # traces kept in memory for /traces
TRACE_CONTENT = "CHATSTREAM_TRACE_CONTENT"      # "true" records message content on spans
TRACES_API = "CHATSTREAM_TRACES_API"            # on | off: the /traces page and /api/traces
API_KEYS_FILE = "CHATSTREAM_API_KEYS_FILE"      # one API key per line; when set, requests need a Bearer key
TERMINATION_LOG = "CHATSTREAM_TERMINATION_LOG"  # where a fatal start-up error is written (/dev/termination-log)

# Standard OpenTelemetry SDK variables the operator sets from spec.tracing.
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
OTEL_METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_EXPORTER_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
