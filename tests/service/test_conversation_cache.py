"""A conversation's next turn reuses the KV cache of the last one, on both APIs, and answers the same."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import metrics

from chatstream.server.app import create_app
from chatstream.settings import Settings

from .apps import make_app, stream_traces

TURNS = ["My name is Alice and I live in Paris.", "What is the capital of France?", "What is my name?"]


@pytest.fixture(params=[0, 4096], ids=["cache-off", "cache-on"])
def srv(request, model_and_tokenizer, live_server):
    _, chat_stream, _ = make_app(*model_and_tokenizer, max_new_tokens=24, prefix_cache_tokens=request.param)
    server = live_server(create_app(Settings(session_secret="s"), chat_stream=chat_stream))
    server.chat_stream = chat_stream
    return server


ANSWERS: dict[str, list[str]] = {}


def test_v1_history_hits_the_cache_and_answers_alike(srv, request):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    messages, answers, cached = [], [], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                           max_tokens=24)
        answers.append(r.choices[0].message.content)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": answers[-1]})
    on = srv.chat_stream.engine.prefix_cache_stats is not None
    if on:
        assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
        assert metrics.total(metrics.scrape(srv.url), "chatstream_prompt_tokens_cached_total") == sum(cached)
        assert metrics.total(metrics.scrape(srv.url), "chatstream_prefix_cache_tokens") > 0
    else:
        assert cached == [0, 0, 0]
    ANSWERS.setdefault("v1", []).append(answers)
    if len(ANSWERS["v1"]) == 2:
        assert ANSWERS["v1"][0] == ANSWERS["v1"][1], "greedy answers with the cache equal those without it"


def test_chat_stream_session_hits_the_cache(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        answers = [client.post("/chat_stream", json={"user_input": text}).text for text in TURNS]
    chats = sorted((chat for _, chat in stream_traces(srv.chat_stream)), key=lambda c: c["start_ns"])
    cached = [c["attributes"]["gen_ai.usage.cache_read_input_tokens"] for c in chats]
    prompts = [c["attributes"]["gen_ai.usage.input_tokens"] for c in chats]
    if srv.chat_stream.engine.prefix_cache_stats is not None:
        assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
        # The hit covers the earlier turns: all but what is new in this turn.
        assert cached[2] >= prompts[1], (cached, prompts)
    else:
        assert cached == [0, 0, 0]
    ANSWERS.setdefault("chat", []).append(answers)
    if len(ANSWERS["chat"]) == 2:
        assert ANSWERS["chat"][0] == ANSWERS["chat"][1]
