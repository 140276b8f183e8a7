"""A conversation longer than the context: its window moves in jumps, the newest turns always in the prompt,
most turns reuse the cache, and every answer equals a fresh request's on the same prompt."""

from __future__ import annotations

import json

import httpx
import openai
from support import metrics

from chatstream.render import encode_chat
from chatstream.server.app import create_app
from chatstream.settings import Settings, library_default
from chatstream.telemetry import Telemetry

from .apps import make_app, stream_traces

CONTEXT, NEW_TOKENS, KEEP = 384, 24, library_default("window_keep")
BUDGET = CONTEXT - NEW_TOKENS
FACTS = ["the river starts high in the mountains where the snow melts in late spring",
         "the town has a stone bridge with five arches that carries the main road",
         "the library lends books, teaches languages and helps people fill in forms",
         "bread needs flour, water, salt and a little yeast, then time to rise",
         "the lighthouse keeper writes the weather in a notebook every evening",
         "bees visit thousands of flowers to make a single spoonful of honey"]


def message(turn: int) -> str:
    return f"Turn {turn}. Remember this: {FACTS[turn % len(FACTS)]}, and {FACTS[(turn + 3) % len(FACTS)]}. Then what?"


def test_a_long_conversation_keeps_its_cache_and_answers_as_a_fresh_request(model_and_tokenizer, live_server):
    model, tokenizer = model_and_tokenizer
    _, chat_stream, _ = make_app(model, tokenizer, context_len=CONTEXT, max_new_tokens=NEW_TOKENS,
                                   prefix_cache_tokens=4096,
                                   telemetry=Telemetry(record_content=True))
    srv = live_server(create_app(Settings(session_secret="s"), chat_stream=chat_stream))
    history: list[dict] = []
    with httpx.Client(base_url=srv.url, timeout=300) as client:
        for turn in range(14):
            r = client.post("/chat_stream", json={"user_input": message(turn)})
            assert r.status_code == 200
            history += [{"role": "user", "content": message(turn)}, {"role": "assistant", "content": r.text}]
        kept = client.get("/get_prompt").json()["prompt"]
    assert all(message(t) in kept for t in range(14)), "the history itself keeps every turn"
    assert len(encode_chat(tokenizer, history)) > 2 * BUDGET, "the conversation outgrew the context twice over"

    chats = sorted((chat["attributes"] for _, chat in stream_traces(chat_stream)), key=lambda a: a["chatstream.conversation.turns"])
    assert [a["chatstream.conversation.turns"] for a in chats] == list(range(1, 15))
    moves = [a["chatstream.conversation.turns"] for a in chats if a["chatstream.conversation.window_moved"]]
    first = moves[0]
    for a in chats:
        n, start = a["chatstream.conversation.turns"], a["chatstream.conversation.turns_left_out"]
        seen = json.loads(a["gen_ai.input.messages"])
        # The prompt is the newest whole turns, this one last, in order: nothing of them cut.
        assert seen == history[2 * start: 2 * n - 1] and seen[-1]["content"] == message(n - 1)
        assert a["gen_ai.usage.input_tokens"] <= BUDGET
        # Every newest turn that fits in KEEP of the budget is in it, and the last exchange with the new turn.
        fitting = next(s for s in range(n) if s == n - 1 or len(encode_chat(tokenizer, history[2 * s: 2 * n - 1]))
                       <= KEEP * BUDGET)
        if n >= 2 and len(encode_chat(tokenizer, history[2 * n - 4: 2 * n - 1])) <= BUDGET:
            fitting = min(fitting, n - 2)
        assert start <= fitting, (n, start, fitting)
    # After the first overflow most turns extend the cached prompt: their hit covers the whole previous turn.
    after = [(prev, a) for prev, a in zip(chats, chats[1:]) if a["chatstream.conversation.turns"] > first]
    extended = [a for prev, a in after if a["gen_ai.usage.cache_read_input_tokens"] >= prev["gen_ai.usage.input_tokens"]]
    assert len(moves) <= 1 + len(after) // 2, moves  # the old rule moved it at every turn
    assert len(extended) == len(after) - (len(moves) - 1), (moves, [a["gen_ai.usage.cache_read_input_tokens"] for _, a in after])
    assert metrics.total(metrics.scrape(srv.url), "chatstream_window_moves_total") == len(moves)

    # The same prompts sent fresh (no cache at all) get the same greedy answers.
    _, fresh, _ = make_app(model, tokenizer, context_len=CONTEXT, max_new_tokens=NEW_TOKENS, prefix_cache_tokens=0)
    plain = live_server(create_app(Settings(session_secret="s"), chat_stream=fresh))
    client = openai.OpenAI(base_url=plain.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    for a in chats:
        if a["chatstream.conversation.turns"] >= first:
            r = client.chat.completions.create(model="", messages=json.loads(a["gen_ai.input.messages"]),
                                               temperature=0, max_tokens=NEW_TOKENS)
            assert r.usage.prompt_tokens == a["gen_ai.usage.input_tokens"]
            assert [{"role": "assistant", "content": r.choices[0].message.content}] == \
                json.loads(a["gen_ai.output.messages"]), a["chatstream.conversation.turns"]
