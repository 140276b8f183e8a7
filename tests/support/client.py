"""A client's reading of a streamed OpenAI chat answer (server-sent events), line by line."""

from __future__ import annotations

import json
import time


class ChatEvents:
    """What one streamed /v1/chat/completions answer showed its client. `feed` takes the
    response's lines one at a time (so a test can act in the middle of a stream); `read` and
    `aread` take them all. Times are seconds since `t0` (time.monotonic(), now by default)."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.monotonic() if t0 is None else t0
        self.status: int | None = None                # the response's, where the caller notes it
        self.comments: list[tuple[float, str]] = []   # ": ..." lines (progress while held)
        self.events = 0                               # data lines, [DONE] aside
        self.errors: list[dict] = []                  # {"error": ...} events
        self.tokens: list[tuple[float, str]] = []     # chunks that carry text: (when, text)
        self.done = False                             # the closing data: [DONE]

    def feed(self, line: str) -> dict | None:
        """Take one line; return the event it carried, if any."""
        now = time.monotonic() - self.t0
        if line.startswith(":"):
            self.comments.append((now, line))
        elif line == "data: [DONE]":
            self.done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            self.events += 1
            if "error" in event:
                self.errors.append(event["error"])
            elif text := event["choices"][0]["delta"].get("content"):
                self.tokens.append((now, text))
            return event
        return None

    def read(self, lines) -> "ChatEvents":
        for line in lines:
            self.feed(line)
        return self

    async def aread(self, lines) -> "ChatEvents":
        async for line in lines:
            self.feed(line)
        return self

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.tokens)

    @property
    def first_token(self) -> float | None:
        """Seconds from t0 to the first chunk with text (the opening chunk naming the role has none)."""
        return self.tokens[0][0] if self.tokens else None

    @property
    def gaps(self) -> list[float]:
        """Seconds between one chunk with text and the next."""
        return [b[0] - a[0] for a, b in zip(self.tokens, self.tokens[1:])]
