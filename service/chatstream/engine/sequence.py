"""One request inside the engine: what the scheduler, the runner and the output processor each keep of it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

from .detokenize import IncrementalDetokenizer, StopMatcher
from .sampling import SamplingParams


class State(enum.Enum):
    """Where a sequence is: queued, holding a row (its prompt going in, or generating), or out of the engine."""
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[object], None]
    cancelled: bool = False    # set from any thread by Engine.cancel; read by the engine thread
    # The scheduler's: where the sequence is and how much of it the cache holds.
    state: State = State.WAITING
    row: int = -1
    length: int = 0            # positions of this sequence held in its cache row
    cached_tokens: int = 0     # prompt positions copied from the prefix cache instead of prefilled
    prefix_key: int | None = None
    # The output processor's.
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    # The runner's (sampling).
    generator: torch.Generator | None = None
