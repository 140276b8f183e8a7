"""Which turns of a conversation the prompt holds: the window, moved forward in jumps.

When a conversation's history no longer fits the prompt budget, its oldest
turns are left out of the prompt (never deleted from the history). Leaving out
one turn at a time, as much as is needed, makes the prompt's beginning change
at every turn once the history is full, so the prefix cache never matches and
every turn prefills the whole window again. Instead the window start is a turn
index saved with the conversation that only moves forward, in jumps: when the
window no longer fits, the oldest turns are left out until the newest ones fill
at most ``keep`` of the budget; the following turns then only add to the end
of the prompt (their earlier tokens come from the cache) until it is full again.

- The newest turn is always in the prompt, and so are the newest turns that fit
  in ``keep`` of the budget, and at least the turn before the newest (the
  exchange a follow-up refers to) when the two fit; whole turns only, the
  system prompt always.
- A jump prefills what it keeps, so a turn costs on average ``keep / (1 -
  keep)`` turns' worth of prefill beyond its own. ``keep`` 1.0 leaves out as few
  turns as possible (the old rule: one turn at a time, the whole window
  prefilled at every turn); ``keep`` 0 keeps only the last exchange after a
  jump. docs/sessions.md has the measured trade-off.
- The choice depends only on the history and the saved start, so a pod that
  loads the session from Redis makes the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import ChatStreamError, bad_request


@dataclass(frozen=True)
class Window:
    ids: list[int]      # the prompt's token ids
    start: int          # turns left out of the prompt, oldest first
    turns: int          # turns in the conversation, the new one included
    moved: bool         # the start moved forward at this turn: the prompt shares only its head with the last one


def fit(render: Callable[[int], list[int]], turns: int, budget: int, keep: float, start: int = 0) -> Window:
    """The window for a conversation of ``turns`` turns whose saved start is ``start``.

    ``render(s)`` is the prompt's token ids with the first ``s`` turns left out. Raises the 400
    ``context_length_exceeded`` when even the newest turn alone does not fit ``budget``.
    """
    if turns < 1:
        return Window(check_fits(render(0), budget), 0, turns, False)
    if not 0 <= start < turns:  # the history was cleared or cut since the start was saved
        start = 0
    ids = render(start)
    if len(ids) <= budget:
        return Window(ids, start, turns, False)
    newest = turns - 1
    target = int(budget * keep)
    rendered: dict[int, list[int]] = {}

    def length(s: int) -> int:
        if s not in rendered:
            rendered[s] = render(s)
        return len(rendered[s])

    length(newest)
    check_fits(rendered[newest], budget)
    # The prompt shrinks as turns are left out: the first start (after the saved one) within the target.
    lo, hi = start + 1, newest
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    # And never less than the last exchange with the new turn (what a follow-up refers to), when they fit.
    if start < newest - 1 < lo and length(newest - 1) <= budget:
        lo = newest - 1
    length(lo)
    return Window(rendered[lo], lo, turns, True)


def check_fits(ids: list[int], limit: int, param: str = "user_input") -> list[int]:
    """The one decision whether a prompt fits, on both APIs: at most ``limit`` tokens (``ChatStreamCore``
    says which limit), else the 400 ``context_length_exceeded``. Returns ``ids``."""
    if len(ids) > limit:
        raise too_long(len(ids), limit, param)
    return ids


def too_long(tokens: int, limit: int, param: str = "user_input") -> ChatStreamError:
    """The refusal of a prompt that cannot fit."""
    return bad_request(f"the input is too long for this model's context: {tokens} tokens, the limit is {limit}", param,
                       "context_length_exceeded")
