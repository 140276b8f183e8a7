"""Traces of each stream's lifecycle and callback outcome."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from support.net import free_port

from chatstream.server.app import create_app
from chatstream.settings import Settings
from chatstream.telemetry import Telemetry

from .apps import broken_model, make_app, send_raw, stream_traces, streaming, wait_until

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def srv(one_slot):
    return one_slot


def wait_trace(chat_stream, outcome, children=("chatstream.queue", "chatstream.callback")):
    def ready():
        found = stream_traces(chat_stream, outcome)
        if not found:
            return False
        trace, chat = found[0]
        names = {s["name"] for s in trace["spans"]}
        return all(c in names for c in children)
    wait_until(ready, 30)
    return stream_traces(chat_stream, outcome)[0]


def check_nesting(trace, chat, expect_children):
    spans = {s["span_id"]: s for s in trace["spans"]}
    server = spans[chat["parent_id"]]
    assert server["kind"] == "SERVER" and server["parent_id"] is None
    assert server["attributes"]["http.route"].startswith("/chat_stream")
    children = {s["name"]: s for s in trace["spans"] if s["parent_id"] == chat["span_id"]}
    assert set(children) == set(expect_children)
    for child in children.values():
        assert chat["start_ns"] <= child["start_ns"] <= child["end_ns"] <= chat["end_ns"]
    assert not [s for s in trace["spans"] if s["name"].endswith(("http send", "http receive"))]
    return children


def test_success_trace(srv):
    with httpx.Client(base_url=srv.url) as client:
        with client.stream("POST", "/chat_stream_callback", json={"user_input": "What is the capital of France?"},
                           timeout=120) as r:
            for chunk in r.iter_text():
                if chunk:
                    last_byte_ns = time.time_ns()
    trace, chat = wait_trace(srv.chat_stream, "success")
    children = check_nesting(trace, chat, ["chatstream.queue", "chatstream.prefill", "chatstream.stream",
                                           "chatstream.callback"])
    a = chat["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "chatstream"
    assert a["gen_ai.request.model"] == "smollm2-135m-instruct" and chat["name"] == "chat smollm2-135m-instruct"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"] and a["gen_ai.request.temperature"] == 0.0
    assert [e["name"] for e in chat["events"]] == ["admitted", "first_token", "last_token"]
    assert chat["status"] == "UNSET"
    assert children["chatstream.callback"]["attributes"]["chatstream.outcome"] == "success"
    assert chat["end_ns"] >= last_byte_ns, "the chat span ends no earlier than the last byte reached the client"
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a, "no content by default"


def test_disconnect_while_streaming_trace(srv):
    stream = streaming(srv)
    closing_ns = time.time_ns()  # the server, in this process, may see the close before close() returns
    stream.close()
    trace, chat = wait_trace(srv.chat_stream, "client_disconnected_while_streaming")
    check_nesting(trace, chat, ["chatstream.queue", "chatstream.prefill", "chatstream.stream", "chatstream.callback"])
    assert chat["end_ns"] >= closing_ns, "the chat span lasts until the client went away"
    assert chat["status"] == "UNSET"


def test_disconnect_before_streaming_trace(srv):
    busy = streaming(srv)
    queued = send_raw(srv, "Hello")
    wait_until(lambda: srv.chat_stream.admission.waiting == 1)
    time.sleep(0.2)
    queued.close()
    trace, chat = wait_trace(srv.chat_stream, "client_disconnected_before_streaming")
    children = check_nesting(trace, chat, ["chatstream.queue", "chatstream.callback"])
    assert children["chatstream.queue"]["duration_ms"] >= 150, "the queue span covers the wait"
    assert [e["name"] for e in chat["events"]] == []
    busy.close()


def test_unknown_error_trace_and_raising_callback(srv):
    with broken_model(srv.chat_stream, 0), httpx.Client(base_url=srv.url) as client:
        assert client.post("/chat_stream_raising_callback", json={"user_input": "hi"}, timeout=60).status_code == 500
    trace, chat = wait_trace(srv.chat_stream, "unknown_error_occurred")
    children = check_nesting(trace, chat, ["chatstream.queue", "chatstream.prefill", "chatstream.callback"])
    assert chat["status"] == "ERROR"
    assert any(e["name"] == "exception" and "injected" in e["attributes"]["exception.message"] for e in chat["events"])
    callback = children["chatstream.callback"]
    assert callback["status"] == "ERROR"
    assert any("callback exploded" in e["attributes"].get("exception.message", "") for e in callback["events"])


def test_incoming_traceparent_is_honoured(srv):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with httpx.Client(base_url=srv.url) as client:
        client.post("/chat_stream_callback", json={"user_input": "Hi"}, timeout=60,
                    headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    trace, chat = wait_trace(srv.chat_stream, "success")
    assert trace["trace_id"] == trace_id
    server = next(s for s in trace["spans"] if s["span_id"] == chat["parent_id"])
    assert server["parent_id"] == parent_id


def test_content_only_when_enabled(serve):
    s = serve(Settings(), telemetry=Telemetry(record_content=True))
    httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0})
    trace, chat = wait_trace(s.chat_stream, "success", ("chatstream.stream",))
    assert "capital of France" in chat["attributes"]["gen_ai.input.messages"]
    assert "Paris" in chat["attributes"]["gen_ai.output.messages"]
    assert chat["attributes"]["chatstream.endpoint"] == "/v1/chat/completions"


def test_sampler_from_standard_env(model_and_tokenizer, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    telemetry = Telemetry()
    with telemetry.tracer.start_as_current_span("x"):
        pass
    assert telemetry.store.traces() == []


class OTLPReceiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: decodes each protobuf export request with the OTLP schema."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest() if self.path == "/v1/traces" else ExportMetricsServiceRequest()
        request.ParseFromString(body)
        OTLPReceiver.received.append((self.path, self.headers["Content-Type"], request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_spans_are_exported_over_otlp_http(serve, monkeypatch):
    port = free_port()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", port), OTLPReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chatstream-test")
    try:
        s = serve(Settings())
        chat_stream = s.chat_stream
        assert chat_stream.telemetry.exporting
        httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0})
        wait_trace(chat_stream, "success", ("chatstream.stream",))
        chat_stream.telemetry.shutdown()  # flushes spans and metrics
        wait_until(lambda: {p for p, _, _ in OTLPReceiver.received} == {"/v1/traces", "/v1/metrics"}, 10)
    finally:
        receiver.shutdown()
    assert {ct for _, ct, _ in OTLPReceiver.received} == {"application/x-protobuf"}
    metric_names = {m.name for p, _, r in OTLPReceiver.received if p == "/v1/metrics"
                    for rm in r.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.server.time_to_first_token", "gen_ai.client.token.usage", "chatstream.outcomes"} <= metric_names
    spans, services = [], set()
    for path, _, request in OTLPReceiver.received:
        if path != "/v1/traces":
            continue
        for rs in request.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                spans += list(ss.spans)
    assert services == {"chatstream-test"}
    chat = next(sp for sp in spans if sp.name == "chat smollm2-135m-instruct")
    attrs = {a.key: a.value for a in chat.attributes}
    assert attrs["chatstream.outcome"].string_value == "success"
    assert attrs["gen_ai.usage.output_tokens"].int_value > 0
    assert {sp.name for sp in spans if sp.parent_span_id == chat.span_id} >= {"chatstream.queue", "chatstream.stream"}


@pytest.mark.browser
def test_traces_page(model_and_tokenizer, live_server):
    from playwright.sync_api import sync_playwright
    _, chat_stream, _ = make_app(*model_and_tokenizer, max_new_tokens=48)
    s = live_server(create_app(chat_stream=chat_stream))
    with httpx.Client(base_url=s.url, timeout=60) as client:
        client.post("/chat_stream", json={"user_input": "What is the capital of France?"})
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi"}]})
    wait_until(lambda: len(stream_traces(chat_stream, "success")) == 2)
    api = httpx.get(s.url + "/api/traces").json()["traces"]
    assert [t["summary"]["endpoint"] for t in api] == ["/v1/chat/completions", "/chat_stream"]
    assert all(t["summary"]["ttft_ms"] > 0 and t["summary"]["output_tokens"] > 0 for t in api)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(s.url + "/traces")
        page.wait_for_selector("#streams tr")
        assert page.locator("#streams tr").count() == 2
        assert "success" in page.locator("#streams tr").first.inner_text()
        page.locator("#streams tr").nth(1).click()
        page.wait_for_selector("#waterfall .span")
        labels = page.locator("#waterfall .label").all_inner_texts()
        assert any("chat smollm2" in l for l in labels) and any("chatstream.stream" in l for l in labels)
        assert any(l.startswith("POST /chat_stream") for l in labels)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "traces-page.png"), full_page=True)
        browser.close()
