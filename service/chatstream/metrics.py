"""Metrics, recorded once and published twice: Prometheus (``/metrics``) and OpenTelemetry.

Every measurement goes through one method here that updates both, so the two
views always agree. OpenTelemetry names follow the GenAI semantic conventions
(``gen_ai.server.time_to_first_token``, ``gen_ai.server.time_per_output_token``,
``gen_ai.client.token.usage``) with their recommended bucket boundaries; the
Prometheus names are the ``chatstream_*`` ones below.
"""

from __future__ import annotations

from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

# OpenTelemetry instrument name -> bucket boundaries (applied as views by telemetry.py)
OTEL_BUCKETS = {
    "gen_ai.server.time_to_first_token": TTFT_BUCKETS,
    "gen_ai.server.time_per_output_token": TPOT_BUCKETS,
    "gen_ai.client.token.usage": TOKEN_BUCKETS,
    "chatstream.queue.wait": WAIT_BUCKETS,
}


class Metrics:
    def __init__(self, admission, meter, model_name: str, cache_stats=lambda: None, engine_info=None):
        self.registry = CollectorRegistry()
        r = self.registry
        if engine_info:  # what serves: device, dtype, the CPU linear kernel chosen at start
            info = Gauge("chatstream_engine_info", "How the model is served (always 1)", sorted(engine_info),
                         registry=r)
            info.labels(**engine_info).set(1)
        self.model_attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": model_name,
                            "gen_ai.provider.name": "chatstream"}
        running = Gauge("chatstream_requests_running", "Generations running now", registry=r)
        running.set_function(lambda: admission.processing)
        waiting = Gauge("chatstream_requests_waiting", "Requests queued for a slot", registry=r)
        waiting.set_function(lambda: admission.waiting)
        held = Gauge("chatstream_prefix_cache_tokens", "Prompt tokens whose KV cache is kept for reuse",
                     registry=r)
        held.set_function(lambda: (cache_stats() or {}).get("held_tokens", 0))
        held_bytes = Gauge("chatstream_prefix_cache_bytes", "Bytes of KV cache kept for reuse", registry=r)
        held_bytes.set_function(lambda: (cache_stats() or {}).get("held_bytes", 0))
        self.rejected = Counter("chatstream_requests_rejected", "Requests refused", ["reason"], registry=r)
        self.outcomes = Counter("chatstream_outcomes", "Streams ended, by callback outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("chatstream_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_prompt_tokens = Counter("chatstream_prompt_tokens_cached",
                                            "Prompt tokens read from the KV cache instead of prefilled", registry=r)
        self.completion_tokens = Counter("chatstream_completion_tokens", "Tokens generated", registry=r)
        self.window_moves = Counter("chatstream_window_moves",
                                    "Session turns whose prompt left out more old turns than the turn before "
                                    "(their whole prompt is prefilled again; window.py)", registry=r)
        self.ttft = Histogram("chatstream_time_to_first_token_seconds", "Time from arrival (queue included) to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("chatstream_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.queue_wait = Histogram("chatstream_queue_wait_seconds", "Time spent waiting for a slot",
                                    buckets=WAIT_BUCKETS, registry=r)

        def observe(value_of):
            def callback(options: CallbackOptions):
                return [Observation(value_of(), self.model_attrs)]
            return [callback]
        meter.create_observable_up_down_counter("chatstream.requests.running", observe(lambda: admission.processing),
                                                unit="{request}", description="Generations running now")
        meter.create_observable_up_down_counter("chatstream.requests.waiting", observe(lambda: admission.waiting),
                                                unit="{request}", description="Requests queued for a slot")
        self.o_rejected = meter.create_counter("chatstream.requests.rejected", unit="{request}")
        self.o_outcomes = meter.create_counter("chatstream.outcomes", unit="{request}")
        self.o_tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}")
        self.o_ttft = meter.create_histogram("gen_ai.server.time_to_first_token", unit="s")
        self.o_tpot = meter.create_histogram("gen_ai.server.time_per_output_token", unit="s")
        self.o_wait = meter.create_histogram("chatstream.queue.wait", unit="s")
        self.o_window_moves = meter.create_counter("chatstream.window.moves", unit="{request}")

    def record_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
        self.o_rejected.add(1, {**self.model_attrs, "chatstream.reason": reason})

    def record(self, summary, window=None) -> None:
        """One finished stream (``window``: a session turn's, window.py). Time to first token counts from
        arrival, so queue time shows in it."""
        attrs, t = self.model_attrs, summary.timeline
        self.outcomes.labels(summary.outcome).inc()
        self.o_outcomes.add(1, {**attrs, "chatstream.outcome": summary.outcome})
        if t.admitted_at is None:
            return
        if window is not None and window.moved:
            self.window_moves.inc()
            self.o_window_moves.add(1, attrs)
        wait = t.admitted_at - t.arrived_at
        self.queue_wait.observe(wait)
        self.o_wait.record(wait, attrs)
        self.prompt_tokens.inc(t.prompt_tokens)
        self.cached_prompt_tokens.inc(t.cached_prompt_tokens)
        self.o_tokens.record(t.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.completion_tokens.inc(t.completion_tokens)
        self.o_tokens.record(t.completion_tokens, {**attrs, "gen_ai.token.type": "output"})
        if t.ttft is not None:
            self.ttft.observe(t.ttft)
            self.o_ttft.record(t.ttft, attrs)
            if t.completion_tokens > 1:
                tpot = (t.last_token_at - t.first_token_at) / (t.completion_tokens - 1)
                self.tpot.observe(tpot)
                self.o_tpot.record(tpot, attrs)

    def render(self) -> bytes:
        return generate_latest(self.registry)
