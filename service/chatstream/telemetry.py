"""OpenTelemetry: a tracer provider per ChatStream, recent traces kept in memory, OTLP when configured.

Configuration is the SDK's own: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``..._TRACES_ENDPOINT``) with the http/protobuf protocol. ChatStream adds
only what those lack: ``CHATSTREAM_TRACES_KEEP`` (how many traces the in-memory
store keeps for ``/traces``) and ``CHATSTREAM_TRACE_CONTENT`` (record message
text on spans; off by default, since prompts are user data).

Each stream gets a ``chat {model}`` span (GenAI semantic conventions) under the
HTTP server span, with child spans for the queue wait, the prefill (admission
to first token), the streaming and the completion callback.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from . import envvars
from .metrics import OTEL_BUCKETS
from .lifecycle import UNKNOWN_ERROR

log = logging.getLogger("chatstream.telemetry")

OUTCOME = "chatstream.outcome"
TTFT = "chatstream.time_to_first_token"  # seconds, Timeline.ttft: the traces page shows it


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def span_to_dict(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "duration_ms": (span.end_time - span.start_time) / 1e6 if span.end_time else None,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": _plain(span.attributes),
        "events": [{"name": e.name, "timestamp_ns": e.timestamp, "attributes": _plain(e.attributes)}
                   for e in span.events],
    }


def _plain(attributes) -> dict:
    """Span or event attributes as JSON-ready values (the SDK keeps sequences as tuples)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (attributes or {}).items()}


_QUERY_ATTRIBUTES = ("http.target", "http.url", "url.full", "url.query")


def _without_query(span, scope) -> None:
    """Query strings can carry secrets (``?api_key=``): HTTP spans keep the path only."""
    if span is None or not span.is_recording():
        return
    path = scope.get("path", "")
    span.set_attribute("http.target", path)
    span.set_attribute("url.path", path)
    if scope.get("query_string"):
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        span.set_attribute("http.url", f"{scope.get('scheme', 'http')}://{host}{path}")
        span.set_attribute("url.full", f"{scope.get('scheme', 'http')}://{host}{path}")
        span.set_attribute("url.query", "")


# Headers that carry credentials: redacted on spans even when someone switches header capture on
# (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST=".*").
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")


def sanitized_headers() -> list[str]:
    """The SDK's own sanitize list (its variable) plus the credential headers: passing a list to the
    instrumentor replaces the variable, so both go in."""
    configured = os.environ.get("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "")
    return [h.strip() for h in configured.split(",") if h.strip()] + list(SECRET_HEADERS)


class TraceStore(SpanProcessor):
    """The last ``keep`` traces, as plain dicts, for the /traces page."""

    def __init__(self, keep: int = 200):
        self.keep = keep
        self._traces: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        record = span_to_dict(span)
        with self._lock:
            spans = self._traces.setdefault(record["trace_id"], [])
            spans.append(record)
            self._traces.move_to_end(record["trace_id"])
            while len(self._traces) > self.keep:
                self._traces.popitem(last=False)

    def traces(self) -> list[dict]:
        """Newest first; each with its spans ordered by start time."""
        with self._lock:
            items = [(tid, sorted(spans, key=lambda s: s["start_ns"])) for tid, spans in self._traces.items()]
        return [{"trace_id": tid, "spans": spans} for tid, spans in reversed(items)]

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class Telemetry:
    def __init__(self, service_name: str | None = None, exporter=None, keep: int | None = None,
                 record_content: bool | None = None, metric_readers: list | None = None):
        self.model_name = "model"  # set by ChatStream
        # OTEL_SERVICE_NAME, when set, wins (Resource.create reads it).
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name or "chatstream"}
        resource = Resource.create(attrs)
        self.provider = TracerProvider(resource=resource)
        self.store = TraceStore(keep or int(os.environ.get(envvars.TRACES_KEEP) or 200))
        self.provider.add_span_processor(self.store)
        otlp_configured = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                               or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        if exporter is None and otlp_configured:
            exporter = self._otlp_exporter()
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.exporting = exporter is not None
        self.record_content = _truthy(os.environ.get(envvars.TRACE_CONTENT)) if record_content is None \
            else record_content
        self.tracer = self.provider.get_tracer("chatstream")
        readers = list(metric_readers or [])
        # OTEL_METRICS_EXPORTER=none (the SDK's own switch) keeps metrics to /metrics.
        if otlp_configured and not metric_readers and os.environ.get(envvars.OTEL_METRICS_EXPORTER) != "none":
            readers.append(self._otlp_metric_reader())
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=[
            View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(list(bounds)))
            for name, bounds in OTEL_BUCKETS.items()])
        self.meter = self.meter_provider.get_meter("chatstream")

    @staticmethod
    def _otlp_exporter():
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not installed; exporting with http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()

    @staticmethod
    def _otlp_metric_reader():
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        return PeriodicExportingMetricReader(OTLPMetricExporter())

    def instrument(self, app) -> None:
        """HTTP server spans for ``app``, without a span per streamed chunk."""
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        if getattr(app.state, "chatstream_instrumented", False):
            return
        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider, exclude_spans=["send", "receive"],
                                           excluded_urls="healthz,readyz,metrics,api/traces",
                                           server_request_hook=_without_query,
                                           http_capture_headers_sanitize_fields=sanitized_headers())
        app.state.chatstream_instrumented = True

    def shutdown(self) -> None:
        self.provider.shutdown()
        self.meter_provider.shutdown()

    def record(self, summary, expect_callback: bool = False, window=None) -> "StreamTrace":
        return StreamTrace(self, summary, expect_callback, window)


class StreamTrace:
    """The spans of one finished stream, written from its summary with the times it recorded.

    ``chat {model}`` (GenAI conventions) with the events admitted, first_token, last_token, and the children
    ``chatstream.queue`` (arrival to slot), ``chatstream.prefill`` (slot to first token), ``chatstream.stream``
    (first token to the end) and, when the stream has a callback, ``chatstream.callback``; the chat span ends
    after the callback.
    """

    def __init__(self, telemetry: Telemetry, summary, expect_callback: bool, window=None):
        self.telemetry = telemetry
        tracer = telemetry.tracer
        t, params = summary.timeline, summary.params
        now = time.monotonic()
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "chatstream",
            "gen_ai.request.model": telemetry.model_name,
            "gen_ai.request.max_tokens": params.max_new_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.usage.input_tokens": t.prompt_tokens,
            "gen_ai.usage.cache_read_input_tokens": t.cached_prompt_tokens,
            "gen_ai.usage.output_tokens": t.completion_tokens,
            "chatstream.endpoint": summary.endpoint,
            OUTCOME: summary.outcome,
        }
        if window is not None:  # a session's turn: which of its turns the prompt held (window.py)
            attributes["chatstream.conversation.turns"] = window.turns
            attributes["chatstream.conversation.turns_left_out"] = window.start
            attributes["chatstream.conversation.window_moved"] = window.moved
        if params.top_k:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = list(params.stop)
        if t.ttft is not None:
            attributes[TTFT] = t.ttft
        if t.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = [t.finish_reason]
        if telemetry.record_content:
            if summary.messages is not None:
                attributes["gen_ai.input.messages"] = json.dumps(summary.messages, ensure_ascii=False)
            attributes["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "content": summary.text}],
                                                              ensure_ascii=False)
        self.chat = tracer.start_span(f"chat {telemetry.model_name}", kind=SpanKind.INTERNAL, attributes=attributes,
                                      start_time=t.arrived_ns)
        self._ctx = trace.set_span_in_context(self.chat)
        marks = [("admitted", t.admitted_at), ("first_token", t.first_token_at), ("last_token", t.last_token_at)]
        for name, at in marks:
            if at is not None:
                self.chat.add_event(name, timestamp=t.wall_ns(at))
        phases = [("chatstream.queue", t.arrived_at, t.admitted_at),
                  ("chatstream.prefill", t.admitted_at, t.first_token_at),
                  ("chatstream.stream", t.first_token_at, None)]
        for name, begin, end in phases:
            if begin is not None:
                span = tracer.start_span(name, context=self._ctx, start_time=t.wall_ns(begin))
                span.end(end_time=t.wall_ns(end if end is not None else now))
        if summary.outcome == UNKNOWN_ERROR:
            if summary.error is not None:
                self.chat.record_exception(summary.error)
            self.chat.set_status(Status(StatusCode.ERROR, str(summary.error) if summary.error else summary.outcome))
        self.ended = False
        if not expect_callback:
            self.end()

    @contextmanager
    def callback(self, message: str):
        span = self.telemetry.tracer.start_span("chatstream.callback", context=self._ctx)
        span.set_attribute(OUTCOME, message)
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            span.end()
            self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.chat.end()
