"""Multi-turn conversations: N users, each holding one conversation of T turns.

Every user starts at once and runs its turns back to back (closed loop, no think time
unless asked): it sends turn t, reads the whole streamed answer, then sends turn t+1.
The questions are a fixed list (``question``), so every run and every server sees the
same conversations, and each user's history grows by its own answers.

Two ways to hold a conversation:
  * ``v1``: POST /v1/chat/completions with the WHOLE history each turn (every earlier user
    message and the assistant's answers as the client received them), stream=true,
    stream_options.include_usage. Any OpenAI-compatible server: ours, vLLM, transformers.
  * ``chat_stream``: this project's POST /chat_stream {"user_input": ...} with the user's
    session cookie; only the new input is sent, the server holds the history. The answer
    is plain text deltas, with no token count (see ``count_tokens``).

Timing as in lib.streaming: TTFT = request sent -> first chunk with non-empty content.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from .streaming import TIMEOUT, Answer, post_stream, read_chat_sse

# One opening question per user: 16 different subjects, so users share nothing but the
# chat template's preamble (as real users of one server would).
OPENERS = [
    "I want to grow vegetables on a small balcony. Which vegetables grow well in pots?",
    "How does the gear system on a bicycle work?",
    "I'd like to learn the guitar as an adult. Where should I start?",
    "What causes the seasons on Earth?",
    "Can you explain what a mortgage is and how its interest works?",
    "I'm writing a short story set on a space station. What would daily life there be like?",
    "How do vaccines train the immune system?",
    "What are good habits for sleeping better?",
    "How does a refrigerator keep food cold?",
    "I'm learning Python. What is the difference between a list and a tuple?",
    "What was daily life like in ancient Rome?",
    "How should I prepare for a job interview for a customer support role?",
    "Why is the sky blue?",
    "How do bees make honey?",
    "I want to start running. How should a beginner train for a 5 km race?",
    "How does a magnetic compass work?",
]

# Follow-ups that make sense after any opener; user u asks them starting at index u, so at
# a given turn the users ask different things.
FOLLOW_UPS = [
    "Can you give me a concrete example?",
    "What are the most common mistakes people make with that?",
    "Can you explain that more simply, as if I were twelve years old?",
    "What should I do first? Please go step by step.",
    "How much time does that usually take?",
    "What are the pros and cons?",
    "Is there something about this that people often misunderstand?",
    "Can you summarize what we have discussed so far in a few sentences?",
    "What would you recommend I read or try next?",
]


def question(user: int, turn: int) -> str:
    """The user's message at ``turn`` (0-based): deterministic, the same for every server."""
    if turn == 0:
        return OPENERS[user % len(OPENERS)]
    return FOLLOW_UPS[(user + turn - 1) % len(FOLLOW_UPS)]


@dataclass(kw_only=True)
class Turn(Answer):
    user: int
    turn: int

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1000


async def _read_text(resp: aiohttp.ClientResponse, rec: Turn) -> None:
    parts = []
    async for raw in resp.content.iter_any():
        now = time.perf_counter()
        piece = raw.decode("utf-8", errors="replace")
        if piece:
            parts.append(piece)
            rec.arrived(now)
    rec.text = "".join(parts)


class Conversation:
    """One user's conversation against one server."""

    def __init__(self, api: str, base: str, model: str, user: int, max_tokens: int):
        self.api, self.base, self.model, self.user, self.max_tokens = api, base, model, user, max_tokens
        self.history: list[dict] = []
        # its own cookie jar: the session cookie of /chat_stream (unsafe=True: aiohttp keeps
        # no cookies from IP-address hosts otherwise, and the server is 127.0.0.1)
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True) if api == "chat_stream" else aiohttp.DummyCookieJar(),
            timeout=TIMEOUT)

    async def close(self):
        await self.http.close()

    async def turn(self, turn: int, text: str | None = None) -> Turn:
        """Send turn ``turn`` (its message ``text``, else ``question(user, turn)``) and read the whole answer."""
        q = question(self.user, turn) if text is None else text
        if self.api == "v1":
            url = self.base + "/v1/chat/completions"
            body = {"model": self.model, "messages": self.history + [{"role": "user", "content": q}],
                    "stream": True, "max_tokens": self.max_tokens, "temperature": 0.0,
                    "stream_options": {"include_usage": True}}
            reader = read_chat_sse
        else:
            url, body, reader = self.base + "/chat_stream", {"user_input": q}, _read_text
        rec = Turn(user=self.user, turn=turn, start=time.perf_counter())
        await post_stream(self.http, url, body, rec, reader)
        if rec.ok and self.api == "v1":
            # the client keeps the answer exactly as it received it
            self.history += [{"role": "user", "content": q}, {"role": "assistant", "content": rec.text}]
        return rec


@dataclass
class WorkloadRun:
    users: int
    turns: int
    t0: float
    end: float
    records: list[Turn]
    cpu_s: float


async def run_workload(api: str, base: str | list[str], model: str, users: int, turns: int, max_tokens: int, *,
                       think_s: float = 0.0, first_user: int = 0, log=print) -> WorkloadRun:
    """``base``: one server, or a list of servers that user u talks to the (u mod n)th of. The users are
    ``first_user``... (each user's questions are its own: another range holds other conversations)."""
    records: list[Turn] = []

    async def user(u: int):
        conv = Conversation(api, base if isinstance(base, str) else base[u % len(base)], model, u, max_tokens)
        try:
            for t in range(turns):
                rec = await conv.turn(t)
                records.append(rec)
                if rec.error:
                    log(f"    user {u} turn {t + 1}: {rec.error}")
                if think_s and t < turns - 1:
                    await asyncio.sleep(think_s)
        finally:
            await conv.close()

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(user(u) for u in range(first_user, first_user + users)))
    return WorkloadRun(users=users, turns=turns, t0=t0, end=time.perf_counter(), records=records,
                       cpu_s=time.process_time() - cpu0)
