"""The user's path on a real node: the chart's operator runs as a pod, a
ChatStreamDeployment from manifests/examples becomes pods that really run,
Ready by their own probes, and the chat answers through the Service."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from node_helpers import (
    NODE_NAME, ON_REAL_NODE, OPERATOR_IMAGE, QUESTION, SERVICE_IMAGE, example, model_pods, record, service_url,
)
from support.kube import RELEASE_NS, apply, condition, get, get_list, kubectl, pod_ready, wait_for

pytestmark = pytest.mark.node

NAME = "smollm2-cpu"


def first_answer(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": QUESTION}],
    })
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def chat(operator_pod, module_namespace):
    """The example applied with kubectl; returns once a chat is answered
    through the Service's ClusterIP."""
    ns = module_namespace
    t0 = time.monotonic()
    apply(example(NAME, replicas=2), ns)
    wait_for("the ChatStreamDeployment Ready", lambda: condition(get("csd", NAME, ns), "Ready").get("status") == "True",
             timeout=600, interval=1)
    ready = time.monotonic() - t0
    url = service_url(NAME, ns)
    # kube-proxy's rules land a moment after the endpoints: poll the Service.
    wait_for("a chat answered through the Service", lambda: first_answer(url), timeout=60)
    record("kubectl apply -> csd Ready (2 replicas)", ready)
    record("kubectl apply -> first answered chat", time.monotonic() - t0)
    return ns, url


def test_operator_runs_in_the_cluster_as_a_pod(operator_pod):
    pod = operator_pod
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert pod["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
    assert pod["spec"]["serviceAccountName"] == "chatstream"
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, status
    # Its logs come through the apiserver from the kubelet: it reached the API from inside the pod.
    logs = wait_for("the operator's first log lines",
                    lambda: kubectl("logs", "-n", RELEASE_NS, pod["metadata"]["name"]).stdout.strip(), timeout=60)
    assert "Forbidden" not in logs and "Unauthorized" not in logs, logs[-2000:]


def test_pods_run_on_the_node_and_are_ready_by_their_probes(chat):
    ns, _ = chat
    pods = model_pods(NAME, ns)
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == NODE_NAME
        assert pod["status"]["phase"] == "Running" and pod_ready(pod)
        assert pod["status"]["podIP"].startswith("10.245.0.")
        (container,) = pod["status"]["containerStatuses"]
        assert container["image"].endswith(SERVICE_IMAGE.split("/", 1)[1]) and container["restartCount"] == 0
        assert container["started"] and container["ready"]
        init = pod["status"]["initContainerStatuses"][0]
        assert init["state"]["terminated"]["exitCode"] == 0  # seed-cache copied the baked model
    header, row = kubectl("get", "csd", NAME, "-n", ns).stdout.splitlines()[:2]
    columns = dict(zip(header.split(), row.split()))
    assert columns["READY"] == "2", (header, row)  # as a user sees it
    assert condition(get("csd", NAME, ns), "Ready")["status"] == "True"
    # The operator in the cluster did the work: its log names the resource.
    op = get_list("pods", RELEASE_NS, "app.kubernetes.io/name=chatstream-operator")[0]
    assert NAME in kubectl("logs", "-n", RELEASE_NS, op["metadata"]["name"]).stdout


def test_chat_stream_through_the_cluster_ip(chat):
    _, url = chat
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/set_generation_params", json={"temperature": 0}).raise_for_status()
        with client.stream("POST", "/chat_stream", json={"user_input": QUESTION}) as r:
            assert r.status_code == 200
            chunks = [c for c in r.iter_text() if c]
    answer = "".join(chunks)
    assert "Paris" in answer, answer
    assert len(chunks) > 1, "the answer should arrive in pieces through the Service"


def test_openai_client_through_the_cluster_ip(chat):
    _, url = chat
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    (model,) = [m.id for m in client.models.list()]
    stream = client.chat.completions.create(
        model=model, temperature=0, stream=True, messages=[{"role": "user", "content": QUESTION}])
    answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in answer, answer


def test_another_pod_reaches_status_endpoint_by_cluster_dns(chat):
    ns, _ = chat
    endpoint = get("csd", NAME, ns)["status"]["endpoint"]
    assert endpoint == f"http://{NAME}.{ns}.svc:8000"
    script = (
        "import json, sys, urllib.request\n"
        "body = json.dumps({'model': 'smollm2-135m-instruct', 'temperature': 0, 'max_tokens': 16,\n"
        f"    'messages': [{{'role': 'user', 'content': {QUESTION!r}}}]}}).encode()\n"
        f"req = urllib.request.Request({endpoint!r} + '/v1/chat/completions', body, {{'content-type': 'application/json'}})\n"
        "print(json.load(urllib.request.urlopen(req, timeout=60))['choices'][0]['message']['content'])\n"
    )
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
        "spec": {
            **ON_REAL_NODE, "restartPolicy": "Never", "automountServiceAccountToken": False,
            "containers": [{
                "name": "client", "image": SERVICE_IMAGE, "command": ["python3", "-c", script],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            }],
        },
    }
    apply(pod, ns)
    phase = wait_for("the client pod to finish",
                     lambda: (get("pod", "client", ns) or {}).get("status", {}).get("phase") in ("Succeeded", "Failed")
                     and get("pod", "client", ns)["status"]["phase"], timeout=120)
    logs = kubectl("logs", "-n", ns, "client").stdout
    assert phase == "Succeeded", logs
    assert "Paris" in logs, logs
