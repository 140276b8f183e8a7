"""A conversation's next turn reuses the KV cache of the last one, on both APIs, and answers the same."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import metrics

from chatstream.settings import Settings

from .apps import stream_traces

TURNS = ["My name is Alice and I live in Paris.", "What is the capital of France?", "What is my name?"]


@pytest.fixture(params=[0, 4096], ids=["cache-off", "cache-on"])
def srv(request, serve):
    return serve(Settings(session_secret="s"), max_new_tokens=24, prefix_cache_tokens=request.param)


ANSWERS: dict[str, list[str]] = {}


def hits_the_cache(srv, cached: list[int]) -> bool:
    """With the cache on, every turn after the first reads part of its prompt from it; with it off, none does."""
    if srv.chat_stream.engine.prefix_cache_stats is None:
        assert cached == [0, 0, 0]
        return False
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    return True


def answered_alike(api: str, answers: list[str]) -> None:
    """Once both parameters have run: the greedy answers with the cache equal those without it."""
    ANSWERS.setdefault(api, []).append(answers)
    if len(ANSWERS[api]) == 2:
        assert ANSWERS[api][0] == ANSWERS[api][1], "greedy answers with the cache equal those without it"


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
    if hits_the_cache(srv, cached):
        assert metrics.total(metrics.scrape(srv.url), "chatstream_prompt_tokens_cached_total") == sum(cached)
        assert metrics.total(metrics.scrape(srv.url), "chatstream_prefix_cache_tokens") > 0
    answered_alike("v1", answers)


def test_chat_stream_session_hits_the_cache(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        answers = [client.post("/chat_stream", json={"user_input": text}).text for text in TURNS]
    chats = sorted((chat for _, chat in stream_traces(srv.chat_stream)), key=lambda c: c["start_ns"])
    cached = [c["attributes"]["gen_ai.usage.cache_read_input_tokens"] for c in chats]
    prompts = [c["attributes"]["gen_ai.usage.input_tokens"] for c in chats]
    if hits_the_cache(srv, cached):
        # The hit covers the earlier turns: all but what is new in this turn.
        assert cached[2] >= prompts[1], (cached, prompts)
    answered_alike("chat", answers)
