"""Which finished sequences' KV the engine keeps, and which kept prefix a new prompt can start from.

Pure bookkeeping (no tensors): the scheduler consults it and hands the runner
:class:`Save` / :class:`Drop` orders for the tensors (a kept prefix is copied
into an admitted sequence's row when the engine prepares it). The rule:

- When a sequence ends (not when it fails) the positions its cache row holds
  (prompt, then the generated tokens that went through the model) are kept as
  one entry, unless an entry already starts with exactly those tokens; entries
  that the new one extends (the earlier turns of the same conversation) are
  dropped, since the new one serves every prompt they served.
- A new prompt starts from the entry sharing its longest prefix, at most all
  but its last token (the last prompt token's logits pick the first new token),
  and prefills only the rest. Matching is on token ids, so it works for a
  client that sends the whole history as well as for server-side sessions.
- The entries hold at most ``budget_tokens`` positions in all; the least
  recently used entries are evicted first.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class Save:
    """Keep the first ``length`` positions of cache row ``row`` as entry ``key``."""
    row: int
    length: int
    key: int


@dataclass(frozen=True)
class Drop:
    """Forget entry ``key``."""
    key: int


class PrefixIndex:
    def __init__(self, budget_tokens: int):
        self.budget_tokens = budget_tokens
        self.entries: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # oldest use first
        self.held_tokens = 0
        self._next_key = 0
        # Accounting: prompt tokens looked up, and the tokens served from kept entries.
        self.prompt_tokens = 0
        self.hit_tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``prompt`` (at most ``len(prompt) - 1``) and that length."""
        limit = len(prompt) - 1
        best_key, best = None, 0
        for key, tokens in self.entries.items():
            n = _common_prefix(tokens, prompt, limit)
            if n > best:
                best_key, best = key, n
        self.prompt_tokens += len(prompt)
        self.hit_tokens += best
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best_key, best

    def insert(self, tokens: list[int]) -> tuple[int | None, list[int]]:
        """Keep ``tokens``: its new key (None when not kept) and the keys to drop (extended or evicted)."""
        if not tokens or len(tokens) > self.budget_tokens:
            return None, []
        for key, held in self.entries.items():
            if len(held) >= len(tokens) and held[:len(tokens)] == tokens:  # already kept
                self.entries.move_to_end(key)
                return None, []
        drops = [key for key, held in self.entries.items() if tokens[:len(held)] == held]
        for key in drops:
            self._forget(key)
        while self.held_tokens + len(tokens) > self.budget_tokens:  # evict first: never above the budget
            oldest = next(iter(self.entries))
            self._forget(oldest)
            drops.append(oldest)
        key, self._next_key = self._next_key, self._next_key + 1
        self.entries[key] = list(tokens)
        self.held_tokens += len(tokens)
        return key, drops

    def _forget(self, key: int) -> None:
        self.held_tokens -= len(self.entries.pop(key))


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit`` (list slices compare in C)."""
    hi = min(len(a), len(b), limit)
    if hi <= 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
