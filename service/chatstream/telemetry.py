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
from .run import UNKNOWN_ERROR

log = logging.getLogger("chatstream.telemetry")

OUTCOME = "chatstream.outcome"


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
        if otlp_configured and not metric_readers:
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
                                           excluded_urls="healthz,readyz,metrics,api/traces")
        app.state.chatstream_instrumented = True

    def shutdown(self) -> None:
        self.provider.shutdown()
        self.meter_provider.shutdown()

    def start_run(self, model: str, endpoint: str, params, prompt_tokens: int, messages=None) -> "RunTrace":
        return RunTrace(self, model, endpoint, params, prompt_tokens, messages)


class RunTrace:
    """The spans of one stream, opened and closed as the stream moves on."""

    def __init__(self, telemetry: Telemetry, model: str, endpoint: str, params, prompt_tokens: int, messages):
        self.telemetry = telemetry
        tracer = telemetry.tracer
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "chatstream",
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": params.max_new_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "chatstream.endpoint": endpoint,
        }
        if params.top_k:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = list(params.stop)
        if telemetry.record_content and messages is not None:
            attributes["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
        self.chat = tracer.start_span(f"chat {model}", kind=SpanKind.INTERNAL, attributes=attributes)
        self._ctx = trace.set_span_in_context(self.chat)
        self.queue = tracer.start_span("chatstream.queue", context=self._ctx)
        self.prefill = self.streaming = None
        self.ended = False

    def _child(self, name: str):
        return self.telemetry.tracer.start_span(name, context=self._ctx)

    def admitted(self) -> None:
        self.queue.end()
        self.chat.add_event("admitted")
        self.prefill = self._child("chatstream.prefill")

    def first_token(self) -> None:
        if self.prefill is not None:
            self.prefill.end()
        self.chat.add_event("first_token")
        self.streaming = self._child("chatstream.stream")

    def finish(self, run, expect_callback: bool) -> None:
        for span in (self.queue, self.prefill, self.streaming):
            if span is not None and span.is_recording():
                span.end()
        chat = self.chat
        if run.last_token_at is not None:
            chat.add_event("last_token", timestamp=time.time_ns() - int((time.monotonic() - run.last_token_at) * 1e9))
        chat.set_attribute("gen_ai.usage.output_tokens", run.completion_tokens)
        chat.set_attribute(OUTCOME, run.outcome)
        if run.finished is not None:
            chat.set_attribute("gen_ai.response.finish_reasons", [run.finished.reason])
        if self.telemetry.record_content:
            chat.set_attribute("gen_ai.output.messages", json.dumps(
                [{"role": "assistant", "content": run.full_text}], ensure_ascii=False))
        if run.outcome == UNKNOWN_ERROR:
            if run.error is not None:
                chat.record_exception(run.error)
            chat.set_status(Status(StatusCode.ERROR, str(run.error) if run.error else run.outcome))
        if not expect_callback:
            self._end()

    @contextmanager
    def callback(self, message: str):
        span = self._child("chatstream.callback")
        span.set_attribute(OUTCOME, message)
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            span.end()
            self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.chat.end()
