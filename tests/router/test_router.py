"""Session-affine routing through the real HAProxy.

Every request goes through haproxy to real `chatstream serve` processes; the
pod that answered is read from the X-Served-By header the router adds, and
cross-checked against the pods' own /metrics where it matters."""

from __future__ import annotations

import collections
import concurrent.futures
import signal
import statistics
import time
import uuid

import httpx
import pytest
from support.net import wait_until

from chatstream_operator import router


MODEL = "smollm2-135m-instruct"
SERVED_BY = router.SERVED_BY_HEADER


def chat_turns(base: str, turns: list[str]) -> list[str]:
    """One /chat_stream conversation (the cookie jar carries the session);
    the pod that answered each turn."""
    served = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for text in turns:
            r = client.post("/chat_stream", json={"user_input": text})
            assert r.status_code == 200, r.text
            served.append(r.headers[SERVED_BY])
    return served


def v1_turns(base: str, first: list[dict], followups: list[str], headers=None, extra=None) -> list[str]:
    """One OpenAI-style conversation: each turn resends the whole history, as
    OpenAI clients do; the pod that answered each turn."""
    messages, served = list(first), []
    with httpx.Client(base_url=base, timeout=120, headers=headers or {}) as client:
        for text in [None, *followups]:
            if text is not None:
                messages.append({"role": "user", "content": text})
            r = client.post("/v1/chat/completions",
                            json={"model": MODEL, "messages": messages, "max_tokens": 4, **(extra or {})})
            assert r.status_code == 200, r.text
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            served.append(r.headers[SERVED_BY])
    return served


def test_chat_stream_session_stays_on_its_pod(proxy, pods):
    before = {p.name: p.outcomes().get("success", 0) for p in pods}
    served = chat_turns(proxy.url, ["Hello, I am Ann.", "What is two plus two?", "Thanks.", "Bye."])
    assert len(set(served)) == 1, served
    # The header tells the truth: only that pod counted the four streams.
    after = {p.name: p.outcomes().get("success", 0) for p in pods}
    assert {n: after[n] - before[n] for n in after} == {n: (4 if n == served[0] else 0) for n in after}


@pytest.mark.parametrize("by", ["session header", "user field"])
def test_v1_conversation_sticks_by_session_header_or_user_field(proxy, by):
    key = uuid.uuid4().hex
    if by == "session header":
        how, entry = {"headers": {"X-Session-Id": key}}, f"h:{key}"
    else:
        how, entry = {"extra": {"user": f"user-{key}"}}, f"u:user-{key}"
    served = v1_turns(proxy.url, [{"role": "user", "content": "Hi there"}], ["And then?", "More."], **how)
    assert len(set(served)) == 1, served
    assert proxy.table()[entry] == served[0]


def test_v1_conversation_sticks_by_first_message(proxy):
    first = f"Tell me about the number {uuid.uuid4().int % 10**6}."
    served = v1_turns(proxy.url, [{"role": "user", "content": first}], ["And then?", "More.", "Last one."])
    assert len(set(served)) == 1, served
    with_system = v1_turns(proxy.url, [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": first + " Briefly."}], ["And then?", "More."])
    assert len(set(with_system)) == 1, with_system


def test_without_stick_rules_conversations_scatter(plain_proxy):
    """The control: the same router minus its stick rules spreads one
    conversation's turns over the pods, so the tests above can fail."""
    served = chat_turns(plain_proxy.url, ["One.", "Two.", "Three."])
    assert len(set(served)) > 1, served
    served = v1_turns(plain_proxy.url, [{"role": "user", "content": "Hi"}], ["a", "b"],
                      headers={"X-Session-Id": uuid.uuid4().hex})
    assert len(set(served)) > 1, served


def spread(counts: collections.Counter, pods) -> float:
    mean = sum(counts.values()) / len(pods)
    return max(counts.get(p.name, 0) for p in pods) / mean


def test_new_sessions_spread_evenly(proxy, pods):
    """30 new /chat_stream sessions, six clients at a time, and 30 new /v1
    conversations one after the other (all with the same system prompt): the
    shared system prompt must not pin them to one pod.

    Under concurrency leastconn balances the requests in flight, not the
    counts: the three pods share two cores, so one may run faster for a
    while and rightly take more sessions (14/8/8 was seen). What a user
    notices is a pod with a queue while another idles, so that is what is
    asserted: with 6 clients over 3 pods, no pod ever held more than 3 at
    once (2 each, plus one while the proxy still counts a stream that just
    ended), read from haproxy's own per-server maximum, and every pod took
    sessions. One at a time, every pod is equally idle and round robin
    decides, so there the counts must be even."""
    def chat(i):
        return chat_turns(proxy.url, [f"Say the number {i}."])[0]

    def v1(i):
        return v1_turns(proxy.url, [{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": f"Count to {i} {uuid.uuid4().hex[:6]}."}], [])[0]

    proxy.admin("clear counters")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        chats = collections.Counter(pool.map(chat, range(30)))
    most_at_once = proxy.most_in_flight()
    v1s = collections.Counter(map(v1, range(30)))
    print(f"\n/chat_stream sessions per pod {dict(chats)}, most in flight at once {most_at_once}; "
          f"/v1 conversations per pod {dict(v1s)}, max/mean {spread(v1s, pods):.2f}")
    assert set(most_at_once) == {p.name for p in pods}, most_at_once
    assert max(most_at_once.values()) <= 3, most_at_once
    assert all(chats[p.name] >= 3 for p in pods), chats
    assert spread(v1s, pods) <= 1.25, v1s


def _first_byte(client: httpx.Client, url: str, body: dict) -> tuple[float, float, int]:
    """(seconds to the first body chunk, seconds to the end, chunks read)."""
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        first, chunks = None, 0
        for _ in r.iter_raw():
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


def test_streams_pass_through_unbuffered_with_little_overhead(proxy, pods):
    body = {"model": MODEL, "stream": True, "max_tokens": 32, "messages": [{"role": "user", "content": "Tell a story."}]}
    with httpx.Client(timeout=120, headers={"X-Session-Id": uuid.uuid4().hex}) as client:
        # The conversation's pod, then the same requests to it direct and through the router.
        r = client.post(f"{proxy.url}/v1/chat/completions", json=body)
        pod = {p.name: p for p in pods}[r.headers[SERVED_BY]]
        direct, routed = [], []
        for _ in range(8):
            direct.append(_first_byte(client, f"{pod.url}/v1/chat/completions", body))
            routed.append(_first_byte(client, f"{proxy.url}/v1/chat/completions", body))
        # What the proxy adds per request, model time aside: a /v1 request the
        # pod answers at once (an unknown model: 404), through the same path
        # (body buffered, json_query, hash, stick table) without the header.
        cheap = {"model": "no-such-model", "messages": [{"role": "user", "content": "Tell a story."}]}
        t_direct, t_routed = [], []
        with httpx.Client(timeout=30) as bare:
            for _ in range(40):
                for url, times in ((pod.url, t_direct), (proxy.url, t_routed)):
                    t0 = time.perf_counter()
                    assert bare.post(f"{url}/v1/chat/completions", json=cheap).status_code == 404
                    times.append(time.perf_counter() - t0)
    # The fastest of each: the model's time varies with the other load on a
    # shared CPU; what the proxy adds is in every sample, the noise is not.
    ttfb_overhead = min(r[0] for r in routed) - min(d[0] for d in direct)
    req_overhead = statistics.median(t_routed) - statistics.median(t_direct)
    print(f"\nTTFB direct min {min(d[0] for d in direct) * 1000:.1f} / median "
          f"{statistics.median(d[0] for d in direct) * 1000:.1f} ms, routed min {min(r[0] for r in routed) * 1000:.1f}"
          f" / median {statistics.median(r[0] for r in routed) * 1000:.1f} ms (overhead of the minima "
          f"{ttfb_overhead * 1000:.2f} ms); "
          f"a cheap /v1 request: {statistics.median(t_direct) * 1000:.2f} ms direct, overhead "
          f"{req_overhead * 1000:.2f} ms (medians of 40); stream "
          f"{statistics.median(r[1] for r in routed) * 1000:.0f} ms in {statistics.median(r[2] for r in routed)} chunks")
    for first, total, chunks in routed:
        # The first token arrives through the proxy long before the stream ends, in many pieces.
        assert chunks > 5 and first < total / 2, (first, total, chunks)
    assert req_overhead < 0.005
    # Model time on a shared CPU varies by tens of ms between runs (either
    # way), so this one only guards against gross buffering.
    assert ttfb_overhead < 0.050


def test_client_disconnect_reaches_the_pod(proxy, pods):
    by_name = {p.name: p for p in pods}
    with httpx.Client(base_url=proxy.url, timeout=120) as client:
        with client.stream("POST", "/chat_stream", json={"user_input": "Write a long story about a dragon."}) as r:
            pod = by_name[r.headers[SERVED_BY]]
            before = pod.outcomes().get("client_disconnected_while_streaming", 0)
            next(r.iter_raw())
        # Leaving the block closed the connection mid-stream.
    t0 = time.monotonic()
    while pod.outcomes().get("client_disconnected_while_streaming", 0) <= before:
        assert time.monotonic() - t0 < 10, pod.outcomes()
        time.sleep(0.05)
    print(f"\nthe pod saw the disconnect after {time.monotonic() - t0:.2f} s")


def test_conversation_moves_when_its_pod_dies_and_keeps_its_history(proxy, pods):
    by_name = {p.name: p for p in pods}
    with httpx.Client(base_url=proxy.url, timeout=120) as client:
        r = client.post("/chat_stream", json={"user_input": "My name is Alice. Please remember it."})
        assert r.status_code == 200
        first = by_name[r.headers[SERVED_BY]]
        first.kill()
        try:
            # At once, before any health check noticed: the router retries on another pod.
            t0 = time.perf_counter()
            r = client.post("/chat_stream", json={"user_input": "What is my name?"})
            print(f"\nthe turn after the kill answered by another pod in {time.perf_counter() - t0:.2f} s")
            assert r.status_code == 200, r.text
            second = r.headers[SERVED_BY]
            assert second != first.name
            prompt = client.get("/get_prompt")
            assert prompt.headers[SERVED_BY] == second
            assert "My name is Alice" in prompt.json()["prompt"]
            # The stickiness entry now names the new pod, and keeps naming it
            # after the old one is back.
            session = client.cookies["chatstream_session"].split(".")[0]
            assert proxy.table()[f"c:{session}"] == second
        finally:
            first.start()
            first.wait_ready()
            time.sleep(1.5)  # health checks see it again
        r = client.post("/chat_stream", json={"user_input": "Thanks."})
        assert r.headers[SERVED_BY] == second


def test_a_draining_pods_refusal_is_answered_by_another_pod(proxy, pods):
    # On the real node, during a rollout, 12 of 116 turns got the draining pod's 503 ("the server is shutting
    # down") in the seconds before the health checks saw it leave. A pod now keeps answering what the router
    # sends until the checks have seen it (runner.ADMIT_AFTER_SIGTERM_SECONDS); then the router sends the
    # conversation elsewhere. The draining pod's own stream in flight ends whole.
    by_name = {p.name: p for p in pods}
    leaving = pods[0]

    def restart(grace: str) -> None:
        leaving.kill()
        leaving.env["CHATSTREAM_SHUTDOWN_GRACE_SECONDS"] = grace
        leaving.start()
        leaving.wait_ready()
        wait_until(lambda: leaving.name in proxy.servers_up(), 30, "haproxy saw the pod up")

    restart("30")
    try:
        # Two conversations on the leaving pod: one streams while it drains, one asks right after SIGTERM.
        on_it = []
        for _ in range(12):
            client = httpx.Client(base_url=proxy.url, timeout=120)
            r = client.post("/chat_stream", json={"user_input": "My name is Erin. Please remember it."})
            assert r.status_code == 200, r.text
            if by_name[r.headers[SERVED_BY]] is leaving:
                on_it.append(client)
                if len(on_it) == 2:
                    break
            else:
                client.close()
        assert len(on_it) == 2, "no two new conversations reached the pod"
        streaming, asking = on_it
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            def long_turn():
                with streaming.stream("POST", "/chat_stream", json={"user_input": "Tell me a long story."}) as r:
                    pieces = r.iter_raw()
                    first = next(pieces)
                    started.set_result(True)
                    return r.status_code, first + b"".join(pieces), r.headers[SERVED_BY]
            started = concurrent.futures.Future()
            long = pool.submit(long_turn)
            started.result(60)
            leaving.proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)  # the pod is draining; the health checks have not seen it yet
            r = asking.post("/chat_stream", json={"user_input": "What is my name?"})
            assert r.status_code == 200, f"a turn sent to the draining pod got {r.status_code}: {r.text}"
            wait_until(lambda: leaving.name not in proxy.servers_up(), 10, "haproxy saw the pod leave")
            r = asking.post("/chat_stream", json={"user_input": "Thanks."})
            assert r.status_code == 200 and r.headers[SERVED_BY] != leaving.name, r.text
            assert "Erin" in asking.get("/get_prompt").json()["prompt"]
            status, body, served = long.result(60)
        assert (status, served) == (200, leaving.name) and body, "the draining pod's stream did not end whole"
        for client in on_it:
            client.close()
    finally:
        leaving.proc.wait(60)
        restart("0")


def test_pods_found_through_cluster_dns_and_one_leaving_it(dns_proxy, pods):
    """The config as the cluster gets it: `server-template` slots filled from
    the headless Service's DNS name (dnsmasq here, CoreDNS there). A pod that
    leaves the Service's endpoints (not ready, or deleted) leaves DNS; the
    router drops it and its conversations move, history kept."""
    hosts = {p.host for p in pods}

    def resolved_up():
        up, addrs = dns_proxy.servers_up(), dns_proxy.addresses()
        return {addrs[s] for s in up}

    wait_until(lambda: resolved_up() == hosts, 30, "the router resolved every pod and saw it up")
    slots = dns_proxy.addresses()
    print(f"\nslots filled from DNS: { {s: a for s, a in slots.items() if a in hosts} }")
    with httpx.Client(base_url=dns_proxy.url, timeout=120) as client:
        served = [client.post("/chat_stream", json={"user_input": t}).headers[SERVED_BY]
                  for t in ("My name is Bob. Please remember it.", "Hello again.")]
        assert len(set(served)) == 1, served
        addr = slots[served[0]]
        dns_proxy.dns.publish(sorted(hosts - {addr}))
        try:
            t0 = time.monotonic()
            wait_until(lambda: addr not in resolved_up(), 30, "the router dropped the pod that left DNS")
            print(f"the router dropped the pod {time.monotonic() - t0:.1f} s after it left DNS")
            r = client.post("/chat_stream", json={"user_input": "What is my name?"})
            assert r.status_code == 200, r.text
            assert dns_proxy.addresses()[r.headers[SERVED_BY]] in hosts - {addr}
            assert "My name is Bob" in client.get("/get_prompt").json()["prompt"]
        finally:
            dns_proxy.dns.publish(sorted(hosts))
        wait_until(lambda: resolved_up() == hosts, 30, "the pod back in the router")
