"""The library's contract over real HTTP with the real default model."""

from __future__ import annotations

import httpx
import pytest

from .apps import make_app

QUESTION = "What is the capital of France?"


@pytest.fixture
def server(model_and_tokenizer, live_server):
    app, chat_stream, log = make_app(*model_and_tokenizer)
    srv = live_server(app)
    srv.chat_stream, srv.log = chat_stream, log
    return srv


def post(client, path, body):
    return client.post(path, json=body, timeout=120)


@pytest.mark.parametrize("path", ["/chat_stream", "/chat_stream_intercept", "/chat_stream_callback"])
def test_greedy_answer_streams_paris(server, path):
    with httpx.Client(base_url=server.url) as client:
        with client.stream("POST", path, json={"user_input": QUESTION, "regenerate": False}, timeout=120) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert r.headers["x-chatstream-last-generated-message-id"]
            chunks = [c for c in r.iter_text() if c]
    answer = "".join(chunks)
    assert "Paris" in answer
    assert len(chunks) > 1, "the answer should arrive in pieces, not at once"


def test_callback_sees_the_conversation_once(server):
    with httpx.Client(base_url=server.url) as client:
        r = post(client, "/chat_stream_callback", {"user_input": QUESTION})
        assert r.status_code == 200
    calls = server.log.wait_for(1)
    assert [c[1] for c in calls] == ["success"]
    assert QUESTION in calls[0][2] and "Paris" in calls[0][2]


def test_multi_turn_regenerate_and_clear(server):
    with httpx.Client(base_url=server.url) as client:
        first = post(client, "/chat_stream", {"user_input": "My name is Alice. Please remember it."}).text
        second = post(client, "/chat_stream", {"user_input": "What is my name?"}).text
        assert "Alice" in second, second
        prompt = client.get("/get_prompt").json()["prompt"]
        assert "My name is Alice" in prompt and first.strip()[:20] in prompt and second.strip()[:20] in prompt

        # Regenerate replaces the last answer: still two answers in the history, the new one last.
        client.post("/set_generation_params", json={"temperature": 1.0})
        again = post(client, "/chat_stream", {"user_input": "", "regenerate": True})
        assert again.status_code == 200
        prompt = client.get("/get_prompt").json()["prompt"]
        assert prompt.count("<|im_start|>assistant") == 2
        assert prompt.rstrip().endswith(again.text.strip() + "<|im_end|>") or again.text.strip() in prompt

        assert client.post("/clear_context").json()["success"] is True
        assert client.get("/get_prompt").json()["prompt"] is None
        # With no history there is nothing to regenerate.
        r = post(client, "/chat_stream", {"user_input": "", "regenerate": True})
        assert r.status_code == 400
        assert "nothing to regenerate" in r.json()["error"]["message"]


def test_sessions_are_separate(server):
    with httpx.Client(base_url=server.url) as alice, httpx.Client(base_url=server.url) as bob:
        post(alice, "/chat_stream", {"user_input": "My name is Alice."})
        post(bob, "/chat_stream", {"user_input": "Hello!"})
        assert "Alice" in alice.get("/get_prompt").json()["prompt"]
        assert "Alice" not in bob.get("/get_prompt").json()["prompt"]


def test_tampered_cookie_starts_a_new_session(server):
    with httpx.Client(base_url=server.url) as client:
        post(client, "/chat_stream", {"user_input": "My name is Alice."})
        cookie = client.cookies["chatstream_session"]
        client.cookies.set("chatstream_session", cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
        assert client.get("/get_prompt").json()["prompt"] is None


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"regenerate": false}', 400, "'user_input' is required"),
    (b'{"user_input": 42}', 400, "must be a string"),
    (b'{"user_input": "   "}', 400, "must not be empty"),
    (b'{"user_input": "hi", "regenerate": "yes"}', 400, "'regenerate' must be true or false"),
    (b'{"user_input": "' + b"x" * (2 << 20) + b'"}', 413, "limit"),
])
def test_bad_input_is_a_clear_4xx_and_loses_nothing(server, body, status, words):
    with httpx.Client(base_url=server.url) as client:
        post(client, "/chat_stream", {"user_input": "My name is Alice."})
        before = client.get("/get_prompt").json()["prompt"]
        r = client.post("/chat_stream", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status
        assert words in r.json()["error"]["message"]
        assert client.get("/get_prompt").json()["prompt"] == before
        assert "Paris" in post(client, "/chat_stream", {"user_input": QUESTION}).text
    assert server.chat_stream.get_load() == {"name": "node:0", "processing": 0, "waiting": 0}


def test_prompt_longer_than_context_is_rejected(server):
    long_input = "word " * 2000
    with httpx.Client(base_url=server.url) as client:
        r = post(client, "/chat_stream", {"user_input": long_input})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert client.get("/get_prompt").json()["prompt"] is None


def test_old_turns_are_left_out_of_the_prompt_to_fit_the_context(model_and_tokenizer, live_server):
    """The model sees the newest turns that fit (system prompt kept); the history keeps them all."""
    app, chat_stream, _ = make_app(*model_and_tokenizer, context_len=160, max_new_tokens=16)
    srv = live_server(app)
    with httpx.Client(base_url=srv.url) as client:
        for i in range(4):
            assert post(client, "/chat_stream", {"user_input": f"Fact number {i}: the sky is blue."}).status_code == 200
        history = client.get("/get_prompt").json()["prompt"]
    assert all(f"Fact number {i}" in history for i in range(4))
    seen = [s for t in chat_stream.telemetry.store.traces() for s in t["spans"]
            if s["attributes"].get("gen_ai.operation.name") == "chat"]
    assert max(s["attributes"]["gen_ai.usage.input_tokens"] for s in seen) <= chat_stream.prompt_budget()
    full = len(chat_stream.encode(history))
    assert full > chat_stream.prompt_budget(), "the whole history would not have fit"
