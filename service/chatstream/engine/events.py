"""What the engine tells a request's consumer, from the engine thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Delta:
    text: str                 # new text, never a split character, never part of a stop string
    completion_tokens: int    # tokens generated so far


@dataclass(frozen=True)
class Finished:
    reason: str               # "stop" (EOS or stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0   # prompt tokens whose KV came from the prefix cache (not prefilled)


@dataclass(frozen=True)
class Failed:
    error: BaseException


class Collector:
    """A consumer that keeps a request's whole text and its end event, for offline use (benchmarks, tests,
    scripts): pass it as `on_event` to Engine.submit, then wait on `done`."""

    def __init__(self):
        self.text, self.end, self.done = "", None, threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            self.text += event.text
        else:
            self.end = event
            self.done.set()
