"""Autoscaling on the real node (spec.autoscaling, docs/autoscaling.md):
scale from zero holding the first requests, a load step from 1 replica with
the new pod held Pending for a while (a slow start), back to zero after the
load; and a resource whose pods never start, for the hold's bounds.

Everything goes through the router's Service, as clients do. Printed: the
replica count over time, the time from a request at zero to its first
token, the reaction time of the first scale-up."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from node_helpers import NODE_NAME, example, model_pods, record, report
from streams import Load
from support.client import ChatEvents
from support.kube import apply, condition, get, kubectl, pod_ready, wait_for
from support.net import wait_ready

pytestmark = pytest.mark.node

NAME = "elastic"
MODEL = "smollm2-135m-instruct"
CLIENTS, MAX_TOKENS = 3, 16
# 3 clients at 2 requests per pod: 2 pods, never 3, with a margin on both sides (the mean
# must pass 2 for a second pod and 4 for a third: a sample that counts one request
# twice as it ends and the next starts moves neither). A short window and delay keep the test short.
AUTOSCALING = {"minReplicas": 0, "maxReplicas": 3, "targetRequestsPerPod": 2, "windowSeconds": 4,
               "scaleDownDelaySeconds": 20, "holdTimeoutSeconds": 240}
SLOW_START_SECONDS = 20   # the second pod stays Pending this long (a taint on the node)
HOLD_TAINT = "chatstream.io/autoscaling-test=hold:NoSchedule"


class Replicas:
    """spec.replicas and readyReplicas of the resource, polled every second, as (seconds, desired, ready)."""

    def __init__(self, name: str, ns: str):
        self.name, self.ns, self.t0 = name, ns, time.monotonic()
        self.seen: list[tuple[float, int, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stopping.is_set():
            try:
                csd = get("csd", self.name, self.ns) or {}
            except AssertionError:  # a kubectl hiccup: the next second's read
                self.stopping.wait(1)
                continue
            desired = (csd.get("spec") or {}).get("replicas", 0)
            ready = (csd.get("status") or {}).get("readyReplicas", 0)
            if not self.seen or self.seen[-1][1:] != (desired, ready):
                self.seen.append((time.monotonic() - self.t0, desired, ready))
            self.stopping.wait(1)

    def __enter__(self) -> "Replicas":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(10)

    def __str__(self) -> str:
        return ", ".join(f"{t:.0f}s {d}/{r}" for t, d, r in self.seen)


def decisions(name: str, ns: str) -> list[str]:
    """The reasons of the resource's autoscaling Events, oldest first."""
    events = json.loads(kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    mine = [e for e in events if e["involvedObject"].get("kind") == "ChatStreamDeployment"
            and e["involvedObject"].get("name") == name and e.get("reason", "").startswith("Scaled")]
    mine.sort(key=lambda e: e.get("eventTime") or e.get("firstTimestamp") or "")  # eventTime: microseconds
    return [e["reason"] for e in mine for _ in range(e.get("count") or 1)]


def wait_reachable(name: str, ns: str) -> str:
    """The router Service's URL once it connects. Ready (or RouterReady) comes
    from the router pod's readiness; kube-proxy programs the Service a moment
    later, and until then a connection is refused. The activator's /signal
    port answers without waking anything, so it is the probe at zero."""
    router = get("service", f"{name}-router", ns)["spec"]["clusterIP"]
    wait_ready(f"http://{router}:8405", 60, path="/signal", interval=0.5)
    return f"http://{router}:8000"


def first_token(url: str, t0: float) -> dict:
    """A streaming /v1 request: progress comments while held, then the answer."""
    body = {"model": MODEL, "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    stream = ChatEvents(t0)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300,
                      headers={"X-Session-Id": uuid.uuid4().hex}) as r:
        stream.read(r.iter_lines())
    out = {"status": r.status_code, "comments": len(stream.comments), "first_token": stream.first_token,
           "done": stream.done, "text": stream.text}
    if stream.errors:  # the hold ran out, or the pod refused: the assertion shows it
        out["error"] = stream.errors[-1]
    return out


def test_from_zero_a_load_step_with_a_slow_start_and_back_to_zero(operator_pod, namespace):
    ns = namespace
    apply(example(NAME, replicas=0, autoscaling=AUTOSCALING, shutdownGraceSeconds=120,
                  concurrency={"maxConcurrentStreams": 2, "maxQueueSize": 16}), ns)
    # At zero the resource is Ready: its router holds requests and starts a pod.
    wait_for("the resource Ready at zero", lambda: condition(get("csd", NAME, ns), "Ready").get("status") == "True",
             timeout=180, interval=1)
    assert not model_pods(NAME, ns)
    url = wait_reachable(NAME, ns)
    with Replicas(NAME, ns) as replicas:
        # From zero: the first requests (/v1 streaming and /chat_stream) are held, then answered.
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            chat = pool.submit(lambda: httpx.post(f"{url}/chat_stream", json={"user_input": "Hello!"}, timeout=300))
            stream = first_token(url, t0)
            chat = chat.result()
        assert stream["status"] == 200 and stream["done"] and "Paris" in stream["text"], stream
        record("scale from zero: request -> first token (/v1, image present)", stream["first_token"])
        assert stream["comments"] >= 1, "a held streaming client saw no progress"
        assert chat.status_code == 200 and chat.text, chat.text
        # A load step from 1 replica; the new pod cannot schedule for a while.
        kubectl("taint", "nodes", NODE_NAME, HOLD_TAINT, "--overwrite")
        try:
            with Load(url, clients=CLIENTS, max_tokens=MAX_TOKENS, new_conversations=True) as load:
                t_load = time.monotonic()
                wait_for("a scale-up", lambda: (get("csd", NAME, ns)["spec"]["replicas"] or 0) >= 2, timeout=60,
                         interval=0.25)
                reaction = time.monotonic() - t_load
                record("load step 1 -> 2 pods: first scale-up after", reaction)
                time.sleep(SLOW_START_SECONDS)
                pending = [p for p in model_pods(NAME, ns) if not pod_ready(p)]
                assert pending and pending[0]["status"].get("phase") == "Pending", "the slow start did not happen"
                assert get("csd", NAME, ns)["spec"]["replicas"] == 2, f"more pods while one was starting: {replicas}"
                kubectl("taint", "nodes", NODE_NAME, HOLD_TAINT + "-")
                wait_for("two pods ready", lambda: sum(pod_ready(p) for p in model_pods(NAME, ns)) == 2, timeout=240,
                         interval=1)
                done = load.tally.completed
                wait_for("streams on two pods", lambda: load.tally.completed >= done + 2 * CLIENTS, timeout=120)
        finally:
            kubectl("taint", "nodes", NODE_NAME, HOLD_TAINT + "-", check=False)
        t_end = time.monotonic()
        csd = get("csd", NAME, ns)
        assert csd["status"]["autoscaling"]["desiredReplicas"] == 2 and csd["status"]["autoscaling"]["reason"] == "ScaledUp"
        assert "ScaledUp" in kubectl("get", "csd", NAME, "-n", ns).stdout
        # Back to zero after the delay; the pods drain.
        wait_for("back to zero", lambda: get("csd", NAME, ns)["spec"]["replicas"] == 0, timeout=120, interval=1)
        record("load end -> scaled to zero", time.monotonic() - t_end)
        wait_for("no model pod left", lambda: not model_pods(NAME, ns), timeout=180, interval=1)
    tally = load.tally
    report(f"autoscaling replicas over time (desired/ready): {replicas}")
    report(f"autoscaling load step: {tally}")
    print(f"\nreplicas (desired/ready) over time: {replicas}\nload: {tally}\ndecisions: {decisions(NAME, ns)}")
    assert not tally.cut, tally.cut[:5]
    assert not tally.failed, tally.failed[:5]
    assert max(d for _, d, _ in replicas.seen) == 2, f"more pods than the load called for: {replicas}"
    ups = [r for r in decisions(NAME, ns) if r in ("ScaledUp", "ScaledFromZero")]
    assert ups == ["ScaledFromZero", "ScaledUp"], f"one scale-up decision per new pod needed: {ups}"
    assert decisions(NAME, ns)[-1] == "ScaledToZero"


def test_held_requests_are_bounded_in_time_and_count(operator_pod, namespace):
    """A resource whose pods never start (no node matches): held requests get
    503 with Retry-After after holdTimeoutSeconds, and more than
    maxHeldRequests get it at once."""
    ns, name = namespace, "never"
    body = example(name, replicas=0, autoscaling={"minReplicas": 0, "maxReplicas": 1, "holdTimeoutSeconds": 3,
                                                  "maxHeldRequests": 2})
    body["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "no-such-node"}
    apply(body, ns)
    wait_for("its router ready", lambda: condition(get("csd", name, ns), "RouterReady").get("status") == "True",
             timeout=120, interval=1)
    url = wait_reachable(name, ns)
    signal = url.replace(":8000", ":8405") + "/signal"
    v1 = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(lambda: (httpx.post(f"{url}/v1/chat/completions", json=v1, timeout=60), time.monotonic() - t0))
                for _ in range(2)]
        wait_for("two requests held", lambda: httpx.get(signal, timeout=5).json()["held"] == 2, timeout=10, interval=0.1)
        t1 = time.monotonic()
        capped = httpx.post(f"{url}/chat_stream", json={"user_input": "Hi"}, timeout=60)
        capped_after = time.monotonic() - t1
        timed_out = [f.result() for f in held]
    assert capped.status_code == 503 and capped.json()["error"]["code"] == "too_many_held_requests", capped.text
    assert int(capped.headers["Retry-After"]) > 0 and capped_after < 2
    for r, took in timed_out:
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_ready_pod", r.text
        assert int(r.headers["Retry-After"]) > 0 and 3 <= took < 10, took
    record("held request past holdTimeoutSeconds=3 answered 503 after", max(t for _, t in timed_out))
