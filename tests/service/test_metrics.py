"""Prometheus /metrics and OpenTelemetry metrics agree, after real traffic of every kind."""

from __future__ import annotations

import httpx
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from support.metrics import samples
from support.net import raw_request

from chatstream import threads
from chatstream.server.app import create_app
from chatstream.telemetry import Telemetry

from .apps import make_app, wait_until


def otel(reader) -> dict:
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    out.setdefault(metric.name, []).append(point)
    return out


def test_prometheus_and_otel_agree(model_and_tokenizer, live_server):
    reader = InMemoryMetricReader()
    _, chat_stream, _ = make_app(*model_and_tokenizer, num_of_concurrent_executions=1, max_queue_size=1,
                                 max_new_tokens=40, telemetry=Telemetry(metric_readers=[reader]))
    srv = live_server(create_app(chat_stream=chat_stream))
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for q in ("What is the capital of France?", "Say hi"):
            assert client.post("/chat_stream", json={"user_input": q}).status_code == 200
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "What is 2+2?"}]})
        busy = raw_request(srv.port, "/chat_stream", b'{"user_input": "Write a long story."}')
        assert b"200 OK" in busy.recv(4096)
        queued = raw_request(srv.port, "/chat_stream", b'{"user_input": "Hello"}')
        wait_until(lambda: chat_stream.admission.waiting == 1)
        assert client.post("/chat_stream", json={"user_input": "refused"}).status_code == 503
        queued.close()
        busy.close()
        wait_until(lambda: chat_stream.admission.processing == 0 and chat_stream.admission.waiting == 0)
        wait_until(lambda: sum(v for (n, _), v in samples(client.get("/metrics").text).items()
                               if n == "chatstream_outcomes_total") == 5)
        p = samples(client.get("/metrics").text)
    o = otel(reader)

    outcomes_otel = {pt.attributes["chatstream.outcome"]: pt.value for pt in o["chatstream.outcomes"]}
    outcomes_prom = {dict(labels)["outcome"]: v for (n, labels), v in p.items() if n == "chatstream_outcomes_total"}
    assert outcomes_otel == outcomes_prom == {"success": 3, "client_disconnected_while_streaming": 1,
                                              "client_disconnected_before_streaming": 1}
    assert p[("chatstream_requests_rejected_total", (("reason", "queue_full"),))] == 1
    assert [pt.value for pt in o["chatstream.requests.rejected"]] == [1]

    tokens = {pt.attributes["gen_ai.token.type"]: pt.sum for pt in o["gen_ai.client.token.usage"]}
    assert tokens["input"] == p[("chatstream_prompt_tokens_total", ())] > 0
    assert tokens["output"] == p[("chatstream_completion_tokens_total", ())] > 0

    for otel_name, prom_name in (("gen_ai.server.time_to_first_token", "chatstream_time_to_first_token_seconds"),
                                 ("gen_ai.server.time_per_output_token", "chatstream_time_per_output_token_seconds"),
                                 ("chatstream.queue.wait", "chatstream_queue_wait_seconds")):
        (point,) = o[otel_name]
        assert point.count == p[(prom_name + "_count", ())] > 0
        assert abs(point.sum - p[(prom_name + "_sum", ())]) < 1e-9
        prom_buckets = sorted(float(dict(labels)["le"]) for (n, labels), _ in p.items()
                              if n == prom_name + "_bucket" and dict(labels)["le"] != "+Inf")
        assert list(point.explicit_bounds) == prom_buckets
    assert p[("chatstream_requests_running", ())] == [pt.value for pt in o["chatstream.requests.running"]][0] == 0
    [info] = [dict(labels) for (n, labels), v in p.items() if n == "chatstream_engine_info" and v == 1]
    assert info == {"device": "cpu", "dtype": "float32", "cpu_linear": chat_stream.engine.cpu_linear,
                    "kernels": "pytorch", "kv_cache": "float32", "threads": str(torch.get_num_threads()),
                    "threads_from": threads.info()["threads_from"]}
    assert info["cpu_linear"] in ("onednn", "torch")
