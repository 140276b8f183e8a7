"""The OpenAI-compatible API, driven by the official openai client over real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from chatstream.server.app import create_app

from .apps import make_app

QUESTION = "What is the capital of France?"


@pytest.fixture
def server(model_and_tokenizer, live_server):
    _, chat_stream, _ = make_app(*model_and_tokenizer, num_of_concurrent_executions=2, max_queue_size=2)
    srv = live_server(create_app(chat_stream=chat_stream))
    srv.chat_stream = chat_stream
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    return srv


def test_models(server):
    assert [m.id for m in server.client.models.list()] == ["smollm2-135m-instruct"]


def test_non_streaming(server):
    r = server.client.chat.completions.create(model="smollm2-135m-instruct", temperature=0,
                                              messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_streaming_with_usage(server):
    stream = server.client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}, {"role": "user", "content": QUESTION}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_max_tokens_and_stop(server):
    r = server.client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=3,
                                              messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = server.client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, stop=[" Paris"],
                                              messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content == "The capital of France is"
    assert r.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(server):
    def ask(seed):
        return server.client.chat.completions.create(
            temperature=1.0, top_p=0.95, seed=seed, max_tokens=16, model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Tell me a one-line joke."}]).choices[0].message.content
    assert ask(5) == ask(5)
    assert len({ask(s) for s in (1, 2, 3)}) > 1


@pytest.mark.parametrize("body, words", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
])
def test_bad_requests(server, body, words):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert words in r.json()["error"]["message"]


def test_malformed_json_and_unknown_model(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{oops",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.chat.completions.create(model="smollm2-135m-instruct",
                                              messages=[{"role": "user", "content": "word " * 1500}])


def test_shares_admission_with_chat_stream(server):
    cs = server.chat_stream
    cs.admission.processing = cs.admission.slots  # every slot taken ...
    for _ in range(cs.admission.max_queue):        # ... and the queue full
        cs.admission._queue.append(object())
    try:
        with pytest.raises(openai.APIStatusError) as err:
            server.client.chat.completions.create(model="smollm2-135m-instruct",
                                                  messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"]
    finally:
        cs.admission.processing = 0
        cs.admission._queue.clear()
