"""The request record: when things happened to one request, and what it produced, counted.

A plain dataclass with no dependencies, so that the lifecycle, metrics, tracing
and the OpenAI usage block read it without loading the engine (torch). The
engine client writes it; ``ttft`` is the one definition of the time to first
token (arrival, queue included, to the first token; the traces page and the
``gen_ai.server.time_to_first_token`` metric both read it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Timeline:
    prompt_tokens: int = 0
    arrived_at: float = field(default_factory=time.monotonic)
    arrived_ns: int = field(default_factory=time.time_ns)   # the same instant, on the wall clock (for spans)
    reserved: bool = False            # it got a queue place: it is an admitted request
    admitted_at: float | None = None  # it got a slot
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival (the queue included) to the first token; None when none came."""
        return None if self.first_token_at is None else self.first_token_at - self.arrived_at

    def wall_ns(self, at: float) -> int:
        return self.arrived_ns + int((at - self.arrived_at) * 1e9)
