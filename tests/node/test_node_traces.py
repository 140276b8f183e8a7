"""Traces the way a user views them: spec.tracing.otlpEndpoint points at a
Jaeger v2 running in the cluster (manifests/tracing/jaeger.yaml, built with Go
by scripts/trace-backend.sh), and the chat spans of the streams this test
made are found through Jaeger's own query API, from every replica, each with
its outcome."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
import yaml
from node_helpers import ON_REAL_NODE, QUESTION, example, model_pods, record
from support.kube import ROOT, apply, condition, get, get_list, pod_ready, run, wait_for

pytestmark = pytest.mark.node

NAME = "traced"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def jaeger_image(node_images, trace_backend_build):
    record("trace backend: Jaeger build (beside the image import), until done", trace_backend_build.wait(timeout=1800))
    t0 = time.monotonic()
    out = run(str(ROOT / "scripts/trace-backend.sh"), "import", timeout=1800)
    record(f"trace backend: Jaeger image + import ({'unchanged' if 'already imported' in out.stderr else 'done'})",
           time.monotonic() - t0)


def jaeger(ns: str) -> str:
    """manifests/tracing/jaeger.yaml applied as a user would, pinned to the real
    node; returns its query API's base URL (the Service's ClusterIP)."""
    docs = list(yaml.safe_load_all((ROOT / "manifests/tracing/jaeger.yaml").read_text()))
    for doc in docs:
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"].update(ON_REAL_NODE)
    apply(yaml.safe_dump_all(docs), ns)

    def ready():
        pods = get_list("pods", ns, "app.kubernetes.io/name=jaeger")
        return len(pods) == 1 and pod_ready(pods[0])

    wait_for("Jaeger Ready", ready, timeout=120, interval=1)
    svc = get("service", "jaeger", ns)
    return f"http://{svc['spec']['clusterIP']}:16686"


def traceparent() -> tuple[str, str]:
    """A W3C trace context of our own, so that the test asks Jaeger for
    exactly the traces it started."""
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def chat(base: str, trace_header: str) -> None:
    r = httpx.post(f"{base}/chat_stream", json={"user_input": QUESTION}, headers={"traceparent": trace_header},
                   timeout=120)
    assert r.status_code == 200, r.text


def chat_and_leave(base: str, trace_header: str) -> None:
    """A /v1 stream the client abandons after its first chunk."""
    body = {"model": MODEL, "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": QUESTION}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers={"traceparent": trace_header},
                      timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())


def trace(query: str, trace_id: str) -> dict | None:
    r = httpx.get(f"{query}/api/traces/{trace_id}", timeout=10)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    [found] = r.json()["data"]
    return found


def chat_span(found: dict) -> tuple[dict, dict, dict]:
    """(the chat span's tags, its process's tags, its process) of one trace."""
    [span] = [s for s in found["spans"] if s["operationName"] == f"chat {MODEL}"]
    process = found["processes"][span["processID"]]
    return ({t["key"]: t["value"] for t in span["tags"]}, {t["key"]: t["value"] for t in process["tags"]}, process)


def test_chat_spans_from_every_replica_reach_the_in_cluster_trace_backend(operator_pod, jaeger_image, namespace):
    ns = namespace
    query = jaeger(ns)
    apply(example(NAME, replicas=2, tracing={"otlpEndpoint": f"http://jaeger.{ns}:4318", "samplingRatio": 1},
                  generation={"maxNewTokens": 24, "contextLength": 2048}), ns)
    wait_for(f"{NAME} Ready", lambda: condition(get("csd", NAME, ns), "Ready").get("status") == "True",
             timeout=600, interval=1)
    pods = {p["status"]["podIP"]: p["metadata"]["name"]
            for p in model_pods(NAME, ns) if pod_ready(p)}
    assert len(pods) == 2, pods

    # Each pod directly (so that both replicas are certain to serve), plus
    # one stream its client leaves early.
    expected: dict[str, tuple[str, str]] = {}  # trace id -> (pod, outcome)
    for ip, pod in pods.items():
        trace_id, header = traceparent()
        chat(f"http://{ip}:8000", header)
        expected[trace_id] = (pod, "success")
    ip, pod = next(iter(pods.items()))
    trace_id, header = traceparent()
    chat_and_leave(f"http://{ip}:8000", header)
    expected[trace_id] = (pod, "client_disconnected_while_streaming")

    # The SDK exports in batches (every 5 s by default): poll the backend.
    def every_trace():
        traces = {tid: trace(query, tid) for tid in expected}
        return traces if all(traces.values()) else None

    t0 = time.monotonic()
    found = wait_for("every trace in Jaeger", every_trace, timeout=90, interval=2)
    record("stream end -> its trace queryable in Jaeger", time.monotonic() - t0)

    seen_pods = set()
    for trace_id, (pod, outcome) in expected.items():
        tags, process_tags, process = chat_span(found[trace_id])
        assert process["serviceName"] == NAME
        assert process_tags.get("k8s.pod.name") == pod, process_tags
        assert process_tags.get("k8s.namespace.name") == ns, process_tags
        assert tags["chatstream.outcome"] == outcome, (trace_id, tags)
        assert tags["gen_ai.usage.input_tokens"] > 0 and tags["gen_ai.request.model"] == MODEL, tags
        seen_pods.add(process_tags["k8s.pod.name"])
    assert seen_pods == set(pods.values()), f"spans from {seen_pods}, replicas {set(pods.values())}"

    # Jaeger's service list knows the deployment by its name (what a user picks first).
    services = httpx.get(f"{query}/api/services", timeout=10).json()["data"]
    assert NAME in services, services
