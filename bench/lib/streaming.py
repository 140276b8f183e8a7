"""Reading one streamed chat answer: the record of its timing and text, and the two readers.

Timing (time.perf_counter, taken when a read returns): ``first`` is the first chunk with
non-empty content (TTFT = first - start), ``events`` every chunk that adds text (the ITL
samples are the gaps between a request's consecutive events).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

# no overall limit (a long answer under load takes minutes); a stalled connection does not hang forever
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)


@dataclass(kw_only=True)
class Answer:
    start: float
    end: float = 0.0
    first: float | None = None                          # first non-empty content
    events: list[float] = field(default_factory=list)   # arrival of each content chunk
    text: str = ""
    tokens: int | None = None                           # server-reported completion tokens
    tokens_retok: int | None = None                     # final text re-tokenized (when the server reports none)
    prompt_tokens: int | None = None                    # server-reported prompt tokens
    cached_tokens: int | None = None                    # usage.prompt_tokens_details.cached_tokens, where sent
    finish: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first is not None

    def arrived(self, now: float) -> None:
        """A chunk that adds text arrived at ``now``."""
        self.events.append(now)
        if self.first is None:
            self.first = now


async def read_chat_sse(resp: aiohttp.ClientResponse, rec: Answer) -> None:
    """An OpenAI /v1/chat/completions stream (SSE ``data:`` lines, ended by ``[DONE]``): the content,
    the usage the server sends (with ``stream_options.include_usage``, or in its last chunk) and the
    finish reason. An error chunk ends the read with ``rec.error``."""
    parts = []
    async for line in resp.content:
        now = time.perf_counter()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            rec.error = f"stream error: {chunk['error']}"
            return
        usage = chunk.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                rec.tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                rec.prompt_tokens = int(usage["prompt_tokens"])
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                rec.cached_tokens = int(cached)
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
                rec.arrived(now)
            if choice.get("finish_reason"):
                rec.finish = choice["finish_reason"]
    rec.text = "".join(parts)


async def post_stream(http: aiohttp.ClientSession, url: str, body: dict, rec: Answer, read) -> Answer:
    """POST ``body`` and read the answer into ``rec`` with ``read(resp, rec)``. A refusal, a broken
    connection or an answer without content is ``rec.error``, counted and never fatal."""
    try:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                await read(resp, rec)
    except asyncio.CancelledError:
        rec.error = "cancelled"
        raise
    except Exception as exc:  # connection reset, timeouts
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.perf_counter()
    if rec.error is None and rec.first is None:
        rec.error = "empty answer"
    return rec
