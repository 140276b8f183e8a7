"""Closed-loop streaming clients for the benchmark.

Each client sends a request, reads the stream to its end and at once sends the next.
Every request goes out without cookies (aiohttp's DummyCookieJar), so a server that
keeps history per session cookie sees a fresh single-turn conversation each time.

Two wire protocols:
  * ``openai``: POST /v1/chat/completions, stream=true, SSE ``data:`` lines; the output
    token count is the server's ``usage.completion_tokens`` (ours sends it with
    ``stream_options.include_usage``; ``transformers serve`` sends it in its last chunk).
  * ``chatstream030``: ChatStream 0.3.0's POST /chat_stream with {"user_input": ...}; the
    body is a sequence of *cumulative* texts, each ended by ``<::EOS::>`` (one per
    generated token, the last one repeated). It reports no token count, so the final text
    is re-tokenized with the model's tokenizer afterwards (see ``count_tokens``).

Timing (time.perf_counter, taken when a read returns):
  * TTFT: request sent -> first chunk with non-empty content.
  * content events: every chunk that adds text; ITL samples are the gaps between a
    request's consecutive content events.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass

import aiohttp
from .streaming import TIMEOUT, Answer, post_stream, read_chat_sse

CHATSTREAM030_END = "<::EOS::>"

# Long-answer prompts: with greedy decoding these run to the 64-token limit, which
# matters for the peers whose protocol cannot ignore EOS (none of the three can).
PROMPTS = [
    "Write a long story about a dragon.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works.",
    "Write a long essay about the history of the printing press.",
    "Describe, step by step and in detail, how to bake a loaf of bread.",
    "Write a long story about a robot who learns to paint.",
    "Explain in detail how the water cycle works.",
    "Write a long letter from a sailor to his family describing a storm at sea.",
]


@dataclass(kw_only=True)
class Record(Answer):
    client: int
    prompt: int


class Protocol:
    name = "?"

    def request(self, base: str, prompt: str, max_tokens: int, model: str) -> tuple[str, dict]:
        raise NotImplementedError

    async def read(self, resp: aiohttp.ClientResponse, rec: Record) -> None:
        raise NotImplementedError


class OpenAIProtocol(Protocol):
    name = "openai /v1/chat/completions (SSE)"

    def request(self, base, prompt, max_tokens, model):
        return base + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.0, "stream_options": {"include_usage": True}}

    async def read(self, resp, rec):
        await read_chat_sse(resp, rec)


class ChatStream030Protocol(Protocol):
    name = "ChatStream 0.3.0 /chat_stream (cumulative text + <::EOS::>)"

    def request(self, base, prompt, max_tokens, model):
        return base + "/chat_stream", {"user_input": prompt}

    async def read(self, resp, rec):
        decoder = codecs.getincrementaldecoder("utf-8")()
        buf, text = "", ""
        async for raw in resp.content.iter_any():
            now = time.perf_counter()
            buf += decoder.decode(raw)
            *segments, buf = buf.split(CHATSTREAM030_END)
            for seg in segments:
                if seg != text:          # one generated token may add no visible text
                    text = seg
                    if seg:
                        rec.arrived(now)
        buf += decoder.decode(b"", final=True)
        if buf.startswith("{"):          # queue full answers 200 {"error": "too_many_requests"}
            rec.error = f"server said: {buf[:200]}"
        rec.text = text
        rec.finish = "end"


PROTOCOLS = {"openai": OpenAIProtocol(), "chatstream030": ChatStream030Protocol()}


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=TIMEOUT)


async def one_request(session, proto: Protocol, base: str, model: str, client: int, prompt_idx: int,
                      max_tokens: int, tag: str = "") -> Record:
    """``tag`` goes before the prompt: a request-unique tag leaves a server's prefix
    cache only the chat template's preamble to reuse, as distinct users' questions would."""
    url, body = proto.request(base, f"{tag}{PROMPTS[prompt_idx]}", max_tokens, model)
    rec = Record(client=client, prompt=prompt_idx, start=time.perf_counter())
    return await post_stream(session, url, body, rec, proto.read)


@dataclass
class LevelRun:
    clients: int
    t0: float                 # clients started
    window: tuple[float, float]
    tail_end: float           # load kept up until here so measured requests finish under load
    end: float                # all requests drained
    records: list[Record]
    cpu_s: float              # CPU time of this (client) process during the level


async def run_level(proto: Protocol, base: str, model: str, clients: int, max_tokens: int, *,
                    duration: float, warmup: float, warmup_cap: float, tail_cap: float,
                    drain_cap: float, repeat_prompts: bool = False, log=print) -> LevelRun:
    """Closed loop at ``clients`` concurrency.

    Warm-up lasts ``warmup`` seconds or until every client has finished one request,
    whichever is later, but at most ``warmup_cap``. The measurement window then lasts
    ``duration``. After it, load is kept up (at most ``tail_cap`` s) until every request
    that was in flight during the window has finished, so they all ran under the same
    load; then no new request is sent and the in-flight ones are drained (at most
    ``drain_cap`` s, then cancelled).
    """
    records: list[Record] = []
    inflight: dict[int, float] = {}   # client -> start of its running request
    done_once: set[int] = set()
    stop = False
    first_round = asyncio.Event()

    async def client(i: int, session):
        n = 0
        while not stop:
            inflight[i] = time.perf_counter()
            tag = "" if repeat_prompts else f"(Request {i}.{n}) "
            rec = await one_request(session, proto, base, model, i, (i + n) % len(PROMPTS), max_tokens, tag)
            del inflight[i]
            records.append(rec)
            n += 1
            if rec.error and rec.error != "cancelled":
                await asyncio.sleep(0.2)  # do not spin on a refusing server
            done_once.add(i)
            if len(done_once) == clients:
                first_round.set()

    cpu0 = time.process_time()
    async with new_session() as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(i, session)) for i in range(clients)]
        await asyncio.sleep(warmup)
        if not first_round.is_set():
            try:
                await asyncio.wait_for(first_round.wait(), timeout=max(0.0, warmup_cap - warmup))
            except asyncio.TimeoutError:
                log(f"    warm-up cap {warmup_cap:.0f}s reached before every client had finished a request")
        w0 = time.perf_counter()
        await asyncio.sleep(duration)
        w1 = time.perf_counter()
        # keep the load up until the requests in flight during the window are done
        deadline = w1 + tail_cap
        while time.perf_counter() < deadline and any(s < w1 for s in list(inflight.values())):
            await asyncio.sleep(0.05)
        tail_end = time.perf_counter()
        stop = True
        _, not_done = await asyncio.wait(tasks, timeout=drain_cap)
        for t in not_done:
            t.cancel()
        if not_done:
            log(f"    drain cap {drain_cap:.0f}s reached: cancelled {len(not_done)} requests")
            await asyncio.gather(*not_done, return_exceptions=True)
        end = time.perf_counter()
    return LevelRun(clients=clients, t0=t0, window=(w0, w1), tail_end=tail_end, end=end,
                    records=records, cpu_s=time.process_time() - cpu0)


def count_tokens(tokenizer, records: list[Record]) -> None:
    """Re-tokenize final texts (done after a level, off the timed path)."""
    texts = [r.text for r in records if r.text]
    if not texts:
        return
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    it = iter(ids)
    for r in records:
        if r.text:
            r.tokens_retok = len(next(it))


async def warm_up(server, model: str, new_tokens: int) -> None:
    """Two requests to a started ``lib.servers.Server``, then one concurrent round."""
    proto = PROTOCOLS[server.peer.protocol]
    async with new_session() as session:
        for i in range(2):
            r = await one_request(session, proto, server.base, model, 0, i, new_tokens)
            if r.error:
                raise RuntimeError(f"warm-up request failed: {r.error}\n{server.tail()}")
        # one concurrent round so batching paths are exercised too (short for peers that
        # take max_tokens; ChatStream 0.3.0 has a fixed max_new_tokens, so skip it there)
        if server.peer.protocol == "openai":
            await asyncio.gather(*(one_request(session, proto, server.base, model, i, i, 8) for i in range(8)))


def warm(server, model: str, new_tokens: int, log=print) -> None:
    """``warm_up``, and how long it took."""
    t = time.perf_counter()
    asyncio.run(warm_up(server, model, new_tokens))
    log(f"  warmed up in {time.perf_counter() - t:.1f}s")
