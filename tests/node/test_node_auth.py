"""API keys on the real node: spec.auth.apiKeysSecretRef mounted by a real
kubelet, the router passing the header, the probes and /metrics open, and a
rotated Secret taking effect in the running pod without a restart (the
kubelet rewrites the mounted file; the server reads it again). Prints how long
the rotation took to reach the pod."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from node_helpers import QUESTION, csd_ready, example, model_pods, record, service_url
from support.kube import apply, kubectl, pod_ready, wait_for

pytestmark = pytest.mark.node

NAME = "keyed"
OLD_KEY, NEW_KEY = "cs-node-old-3f9a1c7e5d", "cs-node-new-8b2e4d6f0a"


def keys_secret(ns: str, *keys: str) -> None:
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-api-keys"},
           "stringData": {"keys": "".join(k + "\n" for k in keys)}}, ns)


def status_with(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code


def test_api_keys_guard_the_model_and_rotate_without_a_restart(operator_pod, namespace):
    ns = namespace
    keys_secret(ns, OLD_KEY)
    apply(example(NAME, replicas=1, auth={"apiKeysSecretRef": {"name": "chat-api-keys"}},
                  generation={"maxNewTokens": 32, "contextLength": 2048}), ns)

    # Ready at all means the kubelet's probes and the router's health checks got through without a key.
    wait_for(f"{NAME} Ready with its router", lambda: csd_ready(NAME, ns), timeout=600, interval=1)
    router = service_url(f"{NAME}-router", ns)
    wait_for("the router answering", lambda: status_with(router, OLD_KEY) == 200, timeout=120)

    # Through the router: no key, a wrong key, the right key (on /v1 with the openai client and on /chat_stream).
    r = httpx.post(f"{router}/chat_stream", json={"user_input": QUESTION}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{router}/v1", api_key="wrong-key", max_retries=0).models.list()
    answer = openai.OpenAI(base_url=f"{router}/v1", api_key=OLD_KEY, max_retries=0).chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=16, messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in answer.choices[0].message.content
    with httpx.Client(base_url=router, headers={"Authorization": f"Bearer {OLD_KEY}"}, timeout=60) as c:
        c.post("/set_generation_params", json={"temperature": 0}).raise_for_status()  # the server samples at 0.7
        assert "Paris" in c.post("/chat_stream", json={"user_input": QUESTION}).text
    # What the kubelet and Prometheus call, on the pod itself: open.
    [pod] = [p for p in model_pods(NAME, ns) if pod_ready(p)]
    ip = pod["status"]["podIP"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"http://{ip}:8000{path}", timeout=10).status_code == 200, path
    assert status_with(f"http://{ip}:8000", None) == 401

    # Rotation: the Secret changes; the same pod, never restarted, takes the new key.
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    keys_secret(ns, NEW_KEY)
    t0 = time.monotonic()
    wait_for("the new key accepted and the old one refused",
             lambda: status_with(router, NEW_KEY) == 200 and status_with(router, OLD_KEY) == 401,
             timeout=240, interval=1)
    took = time.monotonic() - t0
    record("rotated API key in effect in the running pod (kubelet sync + the server's re-read)", took)
    [after] = [p for p in model_pods(NAME, ns) if not p["metadata"].get("deletionTimestamp")]
    assert after["metadata"]["uid"] == pod["metadata"]["uid"], "the pod was replaced"
    assert after["status"]["containerStatuses"][0]["restartCount"] == restarts, "the container restarted"

    # Never logged: the pod's and the router's logs hold neither key.
    logs = kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", "chatstream").stdout
    router_logs = kubectl("logs", "-n", ns, f"deploy/{NAME}-router").stdout
    assert "API keys file" in logs and "changed: 1 key(s)" in logs, logs[-2000:]
    for key in (OLD_KEY, NEW_KEY, "wrong-key"):
        assert key not in logs and key not in router_logs
