"""The four callback outcomes, each provoked over real HTTP, and slots that never leak."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from .apps import LONG, broken_model, send_raw, streaming, wait_until


def load(srv):
    return srv.chat_stream.admission.processing, srv.chat_stream.admission.waiting


@pytest.mark.parametrize("path", ["/chat_stream_callback", "/chat_stream_async_callback"])
def test_success(one_slot, path):
    with httpx.Client(base_url=one_slot.url) as client:
        r = client.post(path, json={"user_input": "What is the capital of France?"}, timeout=120)
    assert r.status_code == 200 and r.text
    calls = one_slot.log.wait_for(1)
    time.sleep(0.3)
    assert [c[1] for c in one_slot.log.calls] == ["success"]
    assert r.text.strip() in calls[0][2], "the callback sees the finished answer in the session"


def test_disconnect_while_streaming_stops_generation(one_slot):
    sock = streaming(one_slot)
    steps_before = one_slot.chat_stream.engine.steps
    sock.close()
    calls = one_slot.log.wait_for(1)
    assert [c[1] for c in calls] == ["client_disconnected_while_streaming"]
    wait_until(lambda: load(one_slot) == (0, 0))
    wait_until(lambda: one_slot.chat_stream.engine.scheduler.active == 0, 5)
    assert one_slot.chat_stream.engine.steps - steps_before < 100, "generation went on after the client left"
    # What was streamed before the disconnect is kept as the (partial) answer.
    assert "dragon" in calls[0][2].lower()


def test_disconnect_while_queued(one_slot):
    busy = streaming(one_slot)
    queued = send_raw(one_slot, "Hello there")
    wait_until(lambda: load(one_slot) == (1, 1))
    queued.close()
    wait_until(lambda: load(one_slot) == (1, 0), 5)  # it left the queue at once
    calls = one_slot.log.wait_for(1)
    assert [c[1] for c in calls] == ["client_disconnected_before_streaming"]
    assert "Hello there" not in calls[0][2], "a request that never streamed leaves no turn behind"
    busy.close()
    assert one_slot.log.outcomes(2) == ["client_disconnected_before_streaming", "client_disconnected_while_streaming"]
    wait_until(lambda: load(one_slot) == (0, 0))


@pytest.mark.parametrize("fail_after, status", [(0, 500), (3, 200)])
def test_unknown_error(one_slot, fail_after, status):
    """Before the first byte a failure is a 500 JSON error; after it, the body is cut short (no clean end),
    so that a client never takes a truncated answer for a whole one."""
    with broken_model(one_slot.chat_stream, fail_after):
        with httpx.Client(base_url=one_slot.url) as client:
            with client.stream("POST", "/chat_stream_callback", json={"user_input": LONG}, timeout=120) as r:
                assert r.status_code == status
                if status == 500:
                    r.read()
                    assert "injected" in r.json()["error"]["message"]
                else:
                    with pytest.raises(httpx.RemoteProtocolError):
                        r.read()
        assert one_slot.log.outcomes(1) == ["unknown_error_occurred"]
    wait_until(lambda: load(one_slot) == (0, 0))
    with httpx.Client(base_url=one_slot.url) as client:  # and the server keeps serving
        assert "Paris" in client.post("/chat_stream", json={"user_input": "What is the capital of France?"},
                                      timeout=120).text


def test_raising_callback_harms_nothing(one_slot):
    with httpx.Client(base_url=one_slot.url) as client:
        for _ in range(2):
            r = client.post("/chat_stream_raising_callback", json={"user_input": "Hi"}, timeout=120)
            assert r.status_code == 200
    assert one_slot.log.outcomes(2) == ["success", "success"]
    wait_until(lambda: load(one_slot) == (0, 0))


def test_slow_callback_does_not_stall_other_streams(one_slot):
    started = time.monotonic()
    one_slot.log.record = lambda request, message: time.sleep(5)  # a callback that blocks for 5 s
    with httpx.Client(base_url=one_slot.url) as client:
        client.post("/chat_stream_callback", json={"user_input": "Hi"}, timeout=120)
        r = client.post("/chat_stream", json={"user_input": "What is the capital of France?"}, timeout=120)
    assert "Paris" in r.text
    assert time.monotonic() - started < 5, "the second stream waited for the first one's callback"


def test_queue_full_is_503_with_retry_after(one_slot):
    socks = [send_raw(one_slot, LONG) for _ in range(3)]
    wait_until(lambda: load(one_slot) == (1, 2))
    with httpx.Client(base_url=one_slot.url) as client:
        r = client.post("/chat_stream_callback", json={"user_input": "one too many"}, timeout=30)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "queue" in r.json()["error"]["message"]
    for s in socks:
        s.close()
    wait_until(lambda: load(one_slot) == (0, 0))
    calls = one_slot.log.wait_for(3)
    assert len(calls) == 3, "a refused request gets no callback; each admitted one gets exactly one"


def test_disconnect_storm_leaks_no_slot(serve):
    srv = serve(num_of_concurrent_executions=2, max_queue_size=3, max_new_tokens=24)
    chat_stream, log = srv.chat_stream, srv.log
    rng = random.Random(7)
    results = {"ok": 0, "refused": 0, "left": 0}

    async def client(i: int):
        await asyncio.sleep(rng.uniform(0, 1.5))
        leave_after = rng.choice([None, 0.05, 0.3, 1.0, 2.0])
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            try:
                coro = c.post("/chat_stream_callback", json={"user_input": f"Count to {i}."})
                r = await (asyncio.wait_for(coro, leave_after) if leave_after else coro)
                results["refused" if r.status_code == 503 else "ok"] += 1
            except asyncio.TimeoutError:
                results["left"] += 1

    async def storm():
        await asyncio.gather(*(client(i) for i in range(24)))

    asyncio.run(storm())
    wait_until(lambda: (chat_stream.admission.processing, chat_stream.admission.waiting) == (0, 0), 30)
    wait_until(lambda: chat_stream.engine.scheduler.active == 0, 10)
    admitted = results["ok"] + results["left"]
    log.wait_for(results["ok"], 30)
    time.sleep(0.5)
    assert results["refused"] > 0 and results["left"] > 0 and results["ok"] > 0, results
    outcomes = [c[1] for c in log.calls]
    assert outcomes.count("success") == results["ok"]
    assert len(outcomes) <= admitted, "a callback fired more than once"
    ended = sum(chat_stream.metrics.outcomes.labels(o)._value.get() for o in set(outcomes) | {"success"})
    assert ended == len(outcomes), "every admitted request ended once and got exactly one callback"
    assert "unknown_error_occurred" not in outcomes
    with httpx.Client(base_url=srv.url) as c:
        load = c.get("/get_load").json()["chatstream_workers"][0]
    assert (load["processing"], load["waiting"]) == (0, 0)
