"""The OpenAI-compatible API, driven by the official openai client over real HTTP."""

from __future__ import annotations

import json

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


def test_a_model_by_its_id(server):
    model = server.client.models.retrieve("smollm2-135m-instruct")
    assert (model.id, model.object, model.owned_by) == ("smollm2-135m-instruct", "model", "chatstream")
    with pytest.raises(openai.NotFoundError, match="does not exist") as err:
        server.client.models.retrieve("gpt-9")
    assert (err.value.body["param"], err.value.body["code"]) == ("model", "model_not_found")


def test_a_hub_id_with_its_slash(server, monkeypatch):
    # Served names from hf:ORG/NAME have a slash; the openai client sends it as %2F, curl as a plain slash.
    monkeypatch.setattr(server.chat_stream, "model_name", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert server.client.models.retrieve("HuggingFaceTB/SmolLM2-135M-Instruct").id == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    r = httpx.get(server.url + "/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct", timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert httpx.get(server.url + "/v1/models/HuggingFaceTB", timeout=30).status_code == 404


@pytest.mark.parametrize("no_tools", [{"tools": []}, {"tool_choice": "none"}, {"tools": [], "tool_choice": "none"},
                                      {"functions": [], "function_call": "none"}])
def test_what_clients_with_no_tools_bound_send(server, no_tools):
    sent = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.content)]})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=http)
    question = {"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": QUESTION}]}
    plain = client.chat.completions.create(**question).choices[0].message.content
    answer = client.chat.completions.create(**question, **no_tools)
    assert answer.choices[0].message.content == plain and "Paris" in plain
    assert answer.choices[0].message.tool_calls is None
    stream = client.chat.completions.create(**question, **no_tools, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain
    for field, value in no_tools.items():  # the client sent them as written (an empty list is not dropped)
        assert f'"{field}":{json.dumps(value)}'.replace(" ", "") in sent[-1].decode().replace(" ", "")


@pytest.mark.parametrize("field, tools", [
    ("tools", {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "weather"}}], "tool_choice": "none"}),
    ("tool_choice", {"tools": [], "tool_choice": "auto"}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "weather"}}}),
])
def test_tools_to_call_are_refused_with_the_field_named(server, field, tools):
    with pytest.raises(openai.BadRequestError) as err:
        server.client.chat.completions.create(model="smollm2-135m-instruct", **tools,
                                              messages=[{"role": "user", "content": QUESTION}])
    assert (err.value.body["param"], err.value.body["code"]) == (field, "unsupported_parameter")
