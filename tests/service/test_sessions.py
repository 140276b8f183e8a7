"""Sessions: what creates one, the store's bounds, floods of new sessions, and the queue-full status."""

from __future__ import annotations

import asyncio
import collections
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import pytest
from fastapi import FastAPI

from chatstream import ChatStream
from chatstream.sessions import MemoryStore, SessionCapacityError

from .apps import make_app, notes_app


def no_cookies() -> CookieJar:
    """A jar that keeps nothing: every request of a client using it arrives without a session."""
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


async def flood(url: str, path: str, body: dict, count: int, concurrency: int = 32) -> list[httpx.Response]:
    """``count`` cookie-less POSTs, ``concurrency`` at a time, over real HTTP."""
    done: list[httpx.Response] = []
    # keepalive_expiry below uvicorn's 5 s: never reuse a connection the server may be closing
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=1)
    async with httpx.AsyncClient(base_url=url, timeout=60, cookies=no_cookies(), limits=limits) as client:
        async def worker(n: int):
            for _ in range(n):
                done.append(await client.post(path, json=body))
        share = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
        await asyncio.gather(*(worker(n) for n in share))
    return done


def assert_error_shape(response: httpx.Response, status: int, code: str):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]
    assert int(response.headers["retry-after"]) >= 1


# -- with the real model app --------------------------------------------------------------------
def chat_app(model, tokenizer, store) -> FastAPI:
    """The documented app (append_middlewares + append_apis) with a given session store."""
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, max_new_tokens=24, temperature=0.0)
    app = FastAPI()
    chat_stream.append_middlewares(app, {"session": {"secret_key": "test-secret", "store": store}})
    chat_stream.append_apis(app)
    return app


def test_a_request_that_stores_nothing_creates_no_session(model_and_tokenizer, live_server):
    store = MemoryStore()
    srv = live_server(chat_app(*model_and_tokenizer, store))
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for method, path, body in [("POST", "/set_generation_params", {}), ("GET", "/get_generation_params", None),
                                   ("GET", "/get_prompt", None), ("POST", "/clear_context", None),
                                   ("POST", "/chat_stream", {"user_input": ""})]:
            r = client.request(method, path, json=body)
            assert r.status_code < 500 and "set-cookie" not in r.headers, (path, r.headers)
        assert len(store) == 0
        r = client.post("/set_generation_params", json={"temperature": 0.5})
        assert "set-cookie" in r.headers, "a setting worth keeping creates the session"
        assert client.get("/get_generation_params").json()["generation_params"]["temperature"] == 0.5
        assert len(store) == 1


def test_a_flood_of_new_sessions_never_evicts_live_users(model_and_tokenizer, live_server):
    """10,100 cookie-less requests used to evict every user's session (store of 10,000).

    The same flood, scaled to a store of 500 so that the test takes seconds."""
    capacity = 500
    srv = live_server(chat_app(*model_and_tokenizer, MemoryStore(max_sessions=capacity)))
    with httpx.Client(base_url=srv.url, timeout=120) as alice:
        assert alice.post("/chat_stream", json={"user_input": "My name is Alice."}).status_code == 200
        alice.post("/set_generation_params", json={"top_k_value": 7})
        before = alice.get("/get_prompt").json()["prompt"]
        assert "Alice" in before

        started = time.monotonic()
        noop = asyncio.run(flood(srv.url, "/set_generation_params", {}, 2 * capacity))
        hostile = asyncio.run(flood(srv.url, "/set_generation_params", {"temperature": 0.5}, capacity + 100))
        print(f"flood: {len(noop) + len(hostile)} requests in {time.monotonic() - started:.1f} s")

        assert alice.get("/get_prompt").json()["prompt"] == before, "Alice's conversation survived"
        assert alice.get("/get_generation_params").json()["generation_params"]["top_k_value"] == 7
        assert all(r.status_code == 200 and "set-cookie" not in r.headers for r in noop)
        statuses = collections.Counter(r.status_code for r in hostile)
        # the store holds Alice's session and 499 newcomers; the rest are told to come back later
        assert statuses == {200: capacity - 1, 503: 101}, statuses
        assert_error_shape(next(r for r in hostile if r.status_code == 503), 503, "session_capacity")
        assert alice.post("/chat_stream", json={"user_input": "What is my name?"}).status_code == 200
        after = alice.get("/get_prompt").json()["prompt"]
        assert "My name is Alice." in after and "What is my name?" in after, "the next turn continues it"


# -- the middleware alone (apps.notes_app), over real HTTP ------------------------------------------
def test_new_sessions_may_evict_only_idle_sessions(live_server):
    store = MemoryStore(max_sessions=20, evictable_after_seconds=1.0)
    srv = live_server(notes_app(store=store))
    active, idle = httpx.Client(base_url=srv.url), httpx.Client(base_url=srv.url)
    assert active.post("/note", json={"note": "active"}).status_code == 200
    assert idle.post("/note", json={"note": "idle"}).status_code == 200

    hostile = asyncio.run(flood(srv.url, "/note", {"note": "x"}, 100, concurrency=8))
    assert collections.Counter(r.status_code for r in hostile) == {200: 18, 503: 82}
    assert_error_shape(next(r for r in hostile if r.status_code == 503), 503, "session_capacity")
    assert len(store) == 20
    assert active.get("/note").json()["note"] == "active" and idle.get("/note").json()["note"] == "idle"

    # one user stays active while the flood's sessions (and the idle user's) age past 1 s
    deadline = time.monotonic() + 1.3
    while time.monotonic() < deadline:
        assert active.get("/note").json()["note"] == "active"
        time.sleep(0.2)
    newcomers = asyncio.run(flood(srv.url, "/note", {"note": "new"}, 19, concurrency=4))
    assert all(r.status_code == 200 for r in newcomers), "idle sessions make room for newcomers"
    assert active.get("/note").json()["note"] == "active", "the active user is never evicted"
    assert len(store) == 20
    refused = asyncio.run(flood(srv.url, "/note", {"note": "late"}, 1))[0]
    assert_error_shape(refused, 503, "session_capacity")


def test_new_sessions_per_client_address_are_capped(live_server):
    store = MemoryStore()
    srv = live_server(notes_app(store=store, new_sessions_per_client_per_minute=5))
    assert all(r.status_code == 200 for r in asyncio.run(flood(srv.url, "/note", {"note": "x"}, 5, concurrency=1)))
    with httpx.Client(base_url=srv.url) as client:
        assert client.get("/note").json() == {"note": None}, "requests that store nothing are not counted"
        assert_error_shape(client.post("/note", json={"note": "6th"}), 429, "session_rate_limited")
        assert "set-cookie" not in client.post("/note", json={"note": "7th"}).headers
    assert len(store) == 5


def test_a_full_store_refuses_explicit_reservations_and_streams_with_503(live_server):
    store = MemoryStore(max_sessions=1, evictable_after_seconds=60)
    srv = live_server(notes_app(store=store))
    with httpx.Client(base_url=srv.url) as first:
        r = first.post("/streamed_note")
        assert r.text == "tick 0\ntick 1\ntick 2\n" and "set-cookie" in r.headers
        assert first.get("/note").json()["note"] == "streamed"
    for path in ("/reserved_note", "/streamed_note", "/note"):
        r = httpx.post(srv.url + path, json={"note": "x"})
        assert_error_shape(r, 503, "session_capacity")
        assert "set-cookie" not in r.headers
    assert len(store) == 1


def test_memory_store_is_bounded_in_count_bytes_and_age():
    async def scenario():
        store = MemoryStore(max_sessions=3, max_idle_seconds=0.3, evictable_after_seconds=0.1)
        for i in range(3):
            data = {"n": i}
            await store.reserve(f"s{i}", data)
            await store.save(f"s{i}", data, store.dumps(data))
        time.sleep(0.15)
        await store.load("s2")  # touching a session keeps it young
        await store.reserve("s3", {"n": 3})  # evicts the least recently used idle one
        assert await store.load("s0") is None and await store.load("s2") == {"n": 2}
        assert len(store) == 3
        time.sleep(0.35)
        assert await store.load("s2") is None, "idle sessions expire"
        await store.reserve("fresh", {})
        assert len(store) == 1

        small = MemoryStore(max_bytes=100, evictable_after_seconds=60)
        big = {"text": "x" * 200}
        await small.reserve("big", big)
        await small.save("big", big, small.dumps(big))
        assert small.bytes > 100, "an existing session always saves"
        with pytest.raises(SessionCapacityError):  # full, and the only session is recent
            await small.reserve("other", {})
    asyncio.run(scenario())


def test_queue_full_can_answer_429(model_and_tokenizer, live_server):
    app, chat_stream, _ = make_app(*model_and_tokenizer, too_many_request_as_http_error=True)
    srv = live_server(app)
    chat_stream.admission.processing = chat_stream.admission.slots
    chat_stream.admission._queue.extend(object() for _ in range(chat_stream.admission.max_queue))
    try:
        r = httpx.post(srv.url + "/chat_stream", json={"user_input": "hi"}, timeout=30)
    finally:
        chat_stream.admission.processing = 0
        chat_stream.admission._queue.clear()
    assert r.status_code == 429 and r.headers["retry-after"]
