"""Prometheus metrics for one ChatStream instance (its own registry).

Histogram boundaries follow the OpenTelemetry GenAI semantic conventions for
``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, admission):
        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("chatstream_requests_running", "Generations running now", registry=r)
        running.set_function(lambda: admission.processing)
        waiting = Gauge("chatstream_requests_waiting", "Requests queued for a slot", registry=r)
        waiting.set_function(lambda: admission.waiting)
        self.rejected = Counter("chatstream_requests_rejected", "Requests refused", ["reason"], registry=r)
        self.outcomes = Counter("chatstream_outcomes", "Streams ended, by callback outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("chatstream_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("chatstream_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("chatstream_time_to_first_token_seconds", "Time from admission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("chatstream_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.queue_wait = Histogram("chatstream_queue_wait_seconds", "Time spent waiting for a slot",
                                    buckets=WAIT_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
