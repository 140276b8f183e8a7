"""Scale from zero through the real router: haproxy on the rendered config with
its activator backend, the activator (`python -m chatstream_operator.activator`,
as the router pod runs it) and a real `chatstream serve` pod.

Zero is the pod's server put in maintenance on haproxy's admin socket (what
haproxy sees when the pods' Service has no ready address); "a pod became
ready" is the server enabled again. In the first test the operator's own
loop (scaler.Scaler, reading the activator's /signal over HTTP) decides, and
its write of the replicas is what enables the server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest
from support import metrics
from support.client import ChatEvents
from support.net import free_port, stop, wait_until

from chatstream import envvars
from chatstream_operator import router, scaler

from .harness import ROOT, Pod, Router, need_haproxy, running

MODEL = "smollm2-135m-instruct"
POD_START_SECONDS = 1.5   # how long the fake Deployment takes to have its pod up


@pytest.fixture(scope="module")
def pod(redis_url, tmp_path_factory):
    # One kernel named: no timing of both at start (what is served does not matter here; the test's time does).
    with running(Pod("pod1", "127.0.0.1", free_port(), redis_url, tmp_path_factory.mktemp("pod"),
                     env={envvars.CPU_LINEAR: "onednn"})) as (p,):
        yield p


@pytest.fixture(scope="module")
def held(pod, tmp_path_factory):
    """haproxy with the activator wiring; its activator is started per test."""
    need_haproxy()
    ports = {"proxy": free_port(), "control": free_port(), "replay": free_port()}
    wiring = {"hold_timeout": 60, "proxy": f"127.0.0.1:{ports['proxy']}", "check_port": ports["control"],
              "replay_bind": f"127.0.0.1:{ports['replay']}"}
    with Router([pod], tmp_path_factory.mktemp("held"), activator=wiring) as r:
        r.ports = ports
        yield r


class Activator:
    def __init__(self, r: Router, log, **args):
        self.router = r
        self.control = f"http://127.0.0.1:{r.ports['control']}"
        argv = [sys.executable, "-m", "chatstream_operator.activator", f"--listen=127.0.0.1:{r.ports['proxy']}",
                f"--control=127.0.0.1:{r.ports['control']}", f"--haproxy-socket={r.socket}",
                f"--replay=http://127.0.0.1:{r.ports['replay']}"] + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'service'}"}
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self):
        wait_until(lambda: httpx.get(self.control + "/healthz", timeout=1).status_code == 200, 30, "the activator up")
        wait_until(lambda: self.server_up(), 30, "haproxy saw the activator up")
        return self

    def server_up(self) -> bool:
        rows = [line.split(",") for line in self.router.admin("show stat").splitlines()]
        return any(f[0] == "activator" and f[1] == "activator" and f[17].startswith("UP") for f in rows if len(f) > 17)

    def __exit__(self, *exc):
        stop(self.proc)

    def signal(self) -> dict:
        return httpx.get(self.control + "/signal", timeout=5).json()

    def metric(self, name: str, **labels: str) -> float:
        return metrics.total(metrics.scrape(self.control, timeout=5), name, **labels)


def to_zero(r: Router) -> None:
    r.admin("disable server pods/pod1")
    wait_until(lambda: not r.servers_up(), 10, "the pod's server down")


def pod_up(r: Router) -> None:
    r.admin("enable server pods/pod1")


def v1_body(stream: bool, content="What is the capital of France?", max_tokens=8) -> dict:
    return {"model": MODEL, "stream": stream, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}


async def sse(client: httpx.AsyncClient, url: str, t0: float, body: dict | None = None) -> ChatEvents:
    """One streaming /v1 request: when its comments and its first token came, and how it ended."""
    stream = ChatEvents(t0)
    async with client.stream("POST", url + "/v1/chat/completions", json=body or v1_body(True)) as r:
        stream.status = r.status_code
        await stream.aread(r.aiter_lines())
    return stream


def test_a_request_at_zero_wakes_the_operator_at_once_is_held_and_answered(held, pod, tmp_path):
    with Activator(held, tmp_path / "activator.log", hold_timeout=60, max_held=10, pod_capacity=8) as act:
        to_zero(held)
        body = {"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment",
                "metadata": {"name": "test", "namespace": "default"},
                "spec": {"replicas": 0, "concurrency": {"maxConcurrentStreams": 4},
                         "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}}
        scaled = []

        async def act_on(b, decision, status):
            # The Deployment gets its pod up a little later.
            scaled.append((time.monotonic(), decision))
            b["spec"]["replicas"] = decision.replicas
            await asyncio.sleep(POD_START_SECONDS)
            pod_up(held)

        async def main():
            reader = scaler.SignalReader(lambda b: act.control + "/signal")
            loop = scaler.Scaler(body, reader, act_on)
            task = asyncio.create_task(loop.run())
            await asyncio.sleep(1.5)  # the operator is polling: a sample or two of nothing
            assert not scaled
            t0 = time.monotonic()
            async with httpx.AsyncClient(timeout=60) as client:
                stream, chat = await asyncio.gather(
                    sse(client, held.url, t0),
                    client.post(held.url + "/chat_stream", json={"user_input": "Hello, I am Ann."}))
                # The next turn of that conversation: straight to its pod, by its cookie.
                again = await client.post(held.url + "/chat_stream", json={"user_input": "What is my name?"})
            task.cancel()
            await reader.close()
            return t0, stream, chat, again, loop

        t0, stream, chat, again, loop = asyncio.run(main())
        woke = scaled[0][0] - t0
        print(f"\nscale from zero: operator woken {woke * 1000:.0f} ms after the request; first token "
              f"{stream.first_token:.2f}s after it (pod up {POD_START_SECONDS}s after the decision); "
              f"{len(stream.comments)} progress comments")
        assert [(d.reason, d.replicas) for _, d in scaled] == [("ScaledFromZero", 1)]
        assert len(loop.decisions) == 1 and "held" in loop.decisions[0].message
        assert woke < 1.0, f"the operator heard of the held request {woke:.2f}s late"
        # The streaming client saw that it waits, then got its answer whole.
        assert stream.status == 200 and stream.comments and stream.comments[0][0] < 1.0
        assert stream.first_token > POD_START_SECONDS and stream.done and not stream.errors
        assert chat.status_code == 200 and chat.text and chat.headers[router.SERVED_BY_HEADER] == "pod1"
        assert again.status_code == 200 and again.headers[router.SERVED_BY_HEADER] == "pod1"
        assert act.metric("chatstream_activator_held_total") == 2
        assert act.metric("chatstream_activator_held_requests") == 0


def test_a_request_held_past_its_bound_gets_503_with_retry_after_and_held_requests_are_capped(held, tmp_path):
    with Activator(held, tmp_path / "activator.log", hold_timeout=2, max_held=2) as act:
        to_zero(held)
        try:
            async def main():
                t0 = time.monotonic()
                async with httpx.AsyncClient(base_url=held.url, timeout=30) as client:
                    async def timed(coro):
                        r = await coro
                        return r, time.monotonic() - t0
                    first = asyncio.create_task(timed(client.post("/v1/chat/completions", json=v1_body(False))))
                    second = asyncio.create_task(sse(client, held.url, t0))
                    while act.signal()["held"] < 2:
                        await asyncio.sleep(0.05)
                    capped = await timed(client.post("/chat_stream", json={"user_input": "Hi"}))
                    return await first, await second, capped

            (timed_out, took), stream, (capped, capped_after) = asyncio.run(main())
        finally:
            pod_up(held)
        for r in (timed_out, capped):
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert timed_out.json()["error"]["code"] == "no_ready_pod" and 2 <= took < 5
        assert capped.json()["error"]["code"] == "too_many_held_requests" and capped_after < 1.5
        # A streaming client got its 200 and progress; its timeout is an error event, then the end.
        assert stream.status == 200 and stream.comments and not stream.first_token
        assert [e["code"] for e in stream.errors] == ["no_ready_pod"] and stream.done
        assert act.metric("chatstream_activator_rejected_total", reason="timeout") == 2
        assert act.metric("chatstream_activator_rejected_total", reason="too_many_held") == 1


def test_held_requests_are_released_into_the_room_a_pod_has(held, tmp_path):
    """With room for one request per pod, three held requests reach the pod
    one after the other, and all are answered."""
    with Activator(held, tmp_path / "activator.log", hold_timeout=60, max_held=10, pod_capacity=1) as act:
        to_zero(held)

        async def main():
            async with httpx.AsyncClient(base_url=held.url, timeout=60) as client:
                sent = [asyncio.create_task(client.post("/v1/chat/completions", json=v1_body(False, f"Count to {i}.")))
                        for i in range(3)]
                while act.signal()["held"] < 3:
                    await asyncio.sleep(0.05)
                held.admin("clear counters")
                pod_up(held)
                return await asyncio.gather(*sent)

        answers = asyncio.run(main())
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert held.most_in_flight()["pod1"] <= 2  # one at a time (a poll's worth of overlap at most)


def test_the_signal_counts_requests_in_flight_and_the_router_is_ready_at_zero(held, tmp_path):
    with Activator(held, tmp_path / "activator.log", hold_timeout=60, max_held=10) as act:
        async def main():
            async with httpx.AsyncClient(base_url=held.url, timeout=60) as client:
                running = [asyncio.create_task(sse(client, held.url, time.monotonic(), v1_body(True, max_tokens=40)))
                           for _ in range(3)]
                seen = []
                while not all(t.done() for t in running):
                    seen.append(act.signal())
                    await asyncio.sleep(0.2)
                await asyncio.gather(*running)
                return seen

        seen = asyncio.run(main())
        assert max(s["load"] for s in seen) == 3 == max(s["in_flight"] for s in seen)
        assert all(s["held"] == 0 and s["pods_up"] == 1 for s in seen)
        assert act.signal()["load"] == 0
        # At zero the router stays ready: it can hold requests.
        to_zero(held)
        try:
            assert httpx.get(f"http://127.0.0.1:{held.monitor}/healthz", timeout=2).status_code == 200
        finally:
            pod_up(held)
    # Without pods or activator it is not.
    to_zero(held)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{held.monitor}/healthz", timeout=2).status_code == 503, 15,
                   "the router unready without pod or activator")
    finally:
        pod_up(held)
        wait_until(lambda: held.servers_up() == {"pod1"}, 10, "the pod's server up again")

