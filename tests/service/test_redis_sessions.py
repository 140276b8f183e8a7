"""Sessions in a real Redis server: shared by replicas, one write per request, a hung Redis answered
with a 503 without stalling anyone else, and no class imported because stored data names it."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import pytest
import redis
from fastapi import FastAPI, Request
from support.net import redis_server as real_redis

from chatstream import ChatPrompt, ChatStream
from chatstream.redis_store import RedisStore
from chatstream.sessions import SessionMiddleware

from .apps import notes_app, ticking



@pytest.fixture
def redis_url(redis_server):
    return redis_server[0]


@pytest.fixture
def redis_server(tmp_path):
    """(its URL, its process); DEBUG SLEEP allowed, to hang it."""
    with real_redis(tmp_path, "--enable-debug-command", "local") as server:
        yield server


def replica(model, tokenizer, url, max_new_tokens: int = 24, context_len: int = 1024, **store_options) -> FastAPI:
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=0.0,
                             context_len=context_len)
    app = FastAPI()
    store = RedisStore(url, **store_options)
    chat_stream.append_middlewares(app, {"session": {"secret_key": "shared-secret", "store": store}})

    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

    chat_stream.append_apis(app)
    return app


def test_conversation_moves_between_replicas(model_and_tokenizer, live_server, redis_url):
    a = live_server(replica(*model_and_tokenizer, redis_url))
    b = live_server(replica(*model_and_tokenizer, redis_url))
    with httpx.Client(base_url=a.url, timeout=120) as client:
        assert client.post("/chat_stream", json={"user_input": "My name is Alice. Please remember it."}).status_code == 200
        cookie = client.cookies["chatstream_session"]
    with httpx.Client(base_url=b.url, timeout=120, cookies={"chatstream_session": cookie}) as client:
        answer = client.post("/chat_stream", json={"user_input": "What is my name?"}).text
        prompt = client.get("/get_prompt").json()["prompt"]
    assert "My name is Alice" in prompt and "Alice" in answer


def test_a_long_conversation_keeps_its_window_on_another_replica(model_and_tokenizer, live_server, redis_url):
    """The turns left out of the prompt are saved with the session, so the replica that takes the next
    turn extends the same window (and its cached beginning) instead of cutting the history anew."""
    a = live_server(replica(*model_and_tokenizer, redis_url, context_len=256))
    b = live_server(replica(*model_and_tokenizer, redis_url, context_len=256))
    r = redis.Redis.from_url(redis_url)

    def saved_start() -> int:
        [key] = r.keys("chatstream:session:*")
        return json.loads(r.get(key))["chat_prompt"]["data"]["window_start"]

    def say(client, turn):
        text = f"Note {turn}: the bridge in the town has five stone arches and carries the main road north."
        assert client.post("/chat_stream", json={"user_input": text}).status_code == 200

    with httpx.Client(base_url=a.url, timeout=120) as client:
        for turn in range(12):
            say(client, turn)
            if saved_start() > 0:  # the history outgrew the context: its window jumped
                break
        start = saved_start()
        cookie = client.cookies["chatstream_session"]
    assert start > 0
    with httpx.Client(base_url=b.url, timeout=120, cookies={"chatstream_session": cookie}) as client:
        say(client, turn + 1)
        assert all(f"Note {t}:" in client.get("/get_prompt").json()["prompt"] for t in range(turn + 2))
    # Counted afresh, the window would have jumped again (past the turn just added); it kept its start.
    assert saved_start() == start


def set_calls(client: redis.Redis) -> int:
    return client.info("commandstats").get("cmdstat_set", {}).get("calls", 0)


def test_one_write_per_request_and_none_for_reads(model_and_tokenizer, live_server, redis_url):
    """The store was once written twice per chat turn, and on every read."""
    srv = live_server(replica(*model_and_tokenizer, redis_url))
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for turn in ("My name is Alice.", "What is my name?"):
            before = set_calls(r)
            assert client.post("/chat_stream", json={"user_input": turn}).status_code == 200
            assert set_calls(r) - before == 1, "one write per chat turn, done before the response ended"
        before = set_calls(r)
        assert "What is my name?" in client.get("/get_prompt").json()["prompt"]
        client.get("/get_generation_params")
        assert set_calls(r) == before, "requests that change nothing write nothing"
        client.post("/set_generation_params", json={"temperature": 0.3})
        assert set_calls(r) == before + 1


PLANTED = """
import pathlib
pathlib.Path({mark!r}).write_text("imported")

class Planted:
    @classmethod
    def from_dict(cls, data):
        return cls()
"""


def test_stored_data_never_names_a_class_to_import(model_and_tokenizer, live_server, redis_url, tmp_path,
                                                   monkeypatch):
    """The store once imported whatever module path the stored JSON named."""
    mark = tmp_path / "planted-was-imported"
    (tmp_path / "planted_sessions_module.py").write_text(PLANTED.format(mark=str(mark)))
    monkeypatch.syspath_prepend(str(tmp_path))
    srv = live_server(replica(*model_and_tokenizer, redis_url))
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        assert client.post("/chat_stream", json={"user_input": "My name is Alice."}).status_code == 200
        [key] = r.keys("chatstream:session:*")
        stored = json.loads(r.get(key))
        stored["planted"] = {"__object__": "planted_sessions_module:Planted", "data": {}}
        r.set(key, json.dumps(stored))
        answer = client.get("/get_prompt")
    assert answer.status_code == 200 and "My name is Alice." in answer.json()["prompt"]
    assert not mark.exists(), "a module named by stored data was imported"


def test_registered_prompt_classes_only(redis_url):
    class MyPrompt(ChatPrompt):
        pass

    async def roundtrip(store: RedisStore, data: dict) -> dict:
        await store.save("s", data, store.dumps(data))
        try:
            return await store.load("s")
        finally:
            await store.aclose()

    prompt = MyPrompt()
    prompt.add_requester_msg("hello")
    with pytest.raises(TypeError, match="register it"):
        RedisStore(redis_url).dumps({"chat_prompt": prompt})
    loaded = asyncio.run(roundtrip(RedisStore(redis_url, classes=[MyPrompt]), {"chat_prompt": prompt}))
    assert type(loaded["chat_prompt"]) is MyPrompt and loaded["chat_prompt"].to_dict() == prompt.to_dict()


def test_a_hung_redis_answers_503_quickly_and_other_streams_keep_flowing(model_and_tokenizer, live_server,
                                                                         redis_url):
    """A synchronous client without timeouts once froze every stream while Redis hung."""
    srv = live_server(replica(*model_and_tokenizer, redis_url, max_new_tokens=400, timeout=0.5, connect_timeout=0.5))
    bob = httpx.Client(base_url=srv.url, timeout=30)
    assert bob.post("/chat_stream", json={"user_input": "My name is Bob."}).status_code == 200

    chunks: list[float] = []
    first = threading.Event()

    def alice():  # a stream on a new session: it needs Redis only when it ends
        with httpx.stream("POST", srv.url + "/chat_stream", timeout=120,
                          json={"user_input": "Count from 1 to 200, one number per line."}) as response:
            for _ in response.iter_bytes():
                chunks.append(time.monotonic())
                first.set()

    streaming = threading.Thread(target=alice)
    streaming.start()
    assert first.wait(60)
    sleeper = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).execute_command("DEBUG", "SLEEP", 3))
    sleeper.start()
    time.sleep(0.2)  # Redis is now frozen for about 3 s
    hung_at = time.monotonic()
    answer = bob.get("/get_prompt")
    waited = time.monotonic() - hung_at
    sleeper.join()  # Redis slept ~3 s: the window below is over
    window = [t for t in chunks if hung_at <= t <= hung_at + 2]
    streaming.join(120)

    assert answer.status_code == 503 and waited < 1.5, (answer.status_code, waited)
    error = answer.json()["error"]
    assert error["code"] == "session_store_unavailable" and set(error) == {"message", "type", "param", "code"}
    assert answer.headers["retry-after"]
    assert chunks[-1] > hung_at + 2, "the stream lasted through the window (else the test proves nothing)"
    gaps = [b - a for a, b in zip([hung_at, *window], window)]
    assert len(window) > 5 and max(gaps) < 0.5, f"the stream stalled while Redis hung: gaps {gaps}"
    recovered = bob.get("/get_prompt")  # Redis answers again: so does the session
    assert recovered.status_code == 200 and "My name is Bob." in recovered.json()["prompt"]


def test_saves_during_and_after_the_response_are_safe(redis_url, live_server):
    """save_session() is the original API: mid-request it only marks the session (one write at the end);
    after the response (a late callback, even on another thread) it writes in the background."""
    app = FastAPI()
    app.add_middleware(SessionMiddleware, secret_key="test-secret", store=RedisStore(redis_url))

    @app.post("/work")
    async def work(request: Request):
        manager = request.state.session
        session = manager.get_session()
        session["a"] = 1
        manager.save_session()
        session["b"] = 2

        def late():
            session["c"] = 3
            manager.save_session()
        threading.Timer(0.3, late).start()
        return {"ok": True}

    srv = live_server(app)
    r = redis.Redis.from_url(redis_url)
    assert httpx.post(srv.url + "/work").status_code == 200
    [key] = r.keys("chatstream:session:*")
    assert json.loads(r.get(key)) == {"a": 1, "b": 2} and set_calls(r) == 1
    deadline = time.monotonic() + 5
    while json.loads(r.get(key)) != {"a": 1, "b": 2, "c": 3}:
        assert time.monotonic() < deadline, "the late save was lost"
        time.sleep(0.05)
    assert set_calls(r) == 2


def test_a_redis_that_accepts_and_never_answers(live_server):
    """A store behind a black hole: requests with a session get a 503 within the timeout; others flow."""
    from itsdangerous import TimestampSigner

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # accepts (the kernel does) and never answers
    store = RedisStore(f"redis://127.0.0.1:{hole.getsockname()[1]}/0", connect_timeout=0.3, timeout=0.3)
    app = notes_app(store=store)

    @app.get("/ticks")
    async def ticks():
        return ticking(40, 0.05)

    srv = live_server(app)
    cookie = {"chatstream_session": TimestampSigner("test-secret").sign("some-session").decode()}
    arrivals: list[float] = []

    def read_ticks():
        with httpx.stream("GET", srv.url + "/ticks", timeout=30) as response:
            for _ in response.iter_lines():
                arrivals.append(time.monotonic())

    try:
        ticker = threading.Thread(target=read_ticks)
        ticker.start()
        while not arrivals:
            time.sleep(0.01)
        started = time.monotonic()
        answers = [httpx.get(srv.url + "/note", cookies=cookie, timeout=10) for _ in range(3)]
        waited = (time.monotonic() - started) / 3
        ticker.join(30)
    finally:
        hole.close()
    for answer in answers:
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "session_store_unavailable"
    assert waited < 1.0, f"each request waited {waited:.2f} s"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) == 40 and max(gaps) < 0.3, f"the other stream stalled: {max(gaps):.2f} s"
    assert httpx.get(srv.url + "/note").json() == {"note": None}, "requests without a session never wait"


def test_a_turn_that_ends_while_redis_is_stopped_is_kept(model_and_tokenizer, live_server, redis_server):
    # On the real node, Redis stopped for 20 s: a stream that ended meanwhile reached its client whole,
    # and its turn was gone from the history. The end of the stream now waits for the store.
    url, proc = redis_server
    srv = live_server(replica(*model_and_tokenizer, url, max_new_tokens=40, timeout=0.5, connect_timeout=0.5))
    client = httpx.Client(base_url=srv.url, timeout=120)
    assert client.post("/chat_stream", json={"user_input": "My name is Carol."}).status_code == 200
    seen: dict[str, float] = {}
    first = threading.Event()

    def stream():
        with client.stream("POST", "/chat_stream", json={"user_input": "Count from 1 to 100."}) as response:
            for _ in response.iter_bytes():
                first.set()
        seen["end"] = time.monotonic()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert first.wait(60)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(5)  # 40 tokens take 1-2 s here: the stream ends while Redis is stopped
    resumed = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    streaming.join(90)
    assert seen["end"] >= resumed, "the stream ended before its turn was stored"
    prompt = client.get("/get_prompt").json()["prompt"]
    assert "My name is Carol." in prompt and "Count from 1 to 100." in prompt, prompt


def test_a_new_conversation_while_redis_is_stopped_is_refused_at_once(model_and_tokenizer, live_server, redis_server):
    # On the real node, a new user's turn during a 20 s Redis outage streamed its answer and then held its end
    # for 61 s (the turn could not be stored). A new conversation now asks the store first: a quick 503 with
    # Retry-After, and nothing held; once Redis is back it is answered and kept.
    url, proc = redis_server
    srv = live_server(replica(*model_and_tokenizer, url, max_new_tokens=16, timeout=0.5, connect_timeout=0.5))
    proc.send_signal(signal.SIGSTOP)
    try:
        client = httpx.Client(base_url=srv.url, timeout=120)
        t0 = time.monotonic()
        refused = client.post("/chat_stream", json={"user_input": "My name is Dora."})
        waited = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGCONT)
    assert refused.status_code == 503, refused.text
    assert refused.headers.get("retry-after") and refused.json()["error"]["code"], refused.text
    assert waited < 3, f"the refusal took {waited:.1f}s"
    assert "set-cookie" not in refused.headers
    assert client.post("/chat_stream", json={"user_input": "My name is Dora."}).status_code == 200
    assert "My name is Dora." in client.get("/get_prompt").json()["prompt"]
