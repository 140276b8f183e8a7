"""Turning token ids into text deltas, and stop strings.

Text is only emitted once it is whole: a byte-level BPE token can end in the
middle of a UTF-8 character, and the decoder then yields U+FFFD; such text is
held back until the next token completes it. Stop strings are matched on the
text, and a suffix that could still become a stop string is held back too, so
the client never sees part of a stop string.
"""

from __future__ import annotations

import collections
import functools


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""


class StopMatcher:
    """Feeds text through, returning what is safe to emit and whether a stop string was hit.

    Matching is an Aho-Corasick automaton over the stop strings: each character fed costs one (amortized)
    transition whatever the number of stops, and the automaton's state *is* the longest suffix of the text
    that may still become a stop string, which is exactly what must be held back. The automaton is built
    once per distinct set of stops and shared. (SamplingParams.validate caps the stops at MAX_STOP_STRINGS
    of MAX_STOP_LENGTH characters, which bounds the build.)
    """

    def __init__(self, stops: list[str]):
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self._automaton = _automaton(self.stops) if self.stops else None
        self._state = 0
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if self._automaton is None:
            out, self.pending = self.pending, ""
            return out, False
        goto, fail, depth, match = self._automaton
        state, cut = self._state, -1
        base = len(self.pending) - len(text)
        for j, ch in enumerate(text, base):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:  # a stop string ends here; keep going for one that starts earlier
                start = j + 1 - match[state]
                cut = start if cut < 0 else min(cut, start)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        self._state = state
        hold = depth[state]
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@functools.lru_cache(maxsize=128)
def _automaton(stops: tuple[str, ...]):
    """(goto, fail, depth, match) of the Aho-Corasick automaton of ``stops``.

    ``depth[n]`` is the length of the prefix node ``n`` stands for; ``match[n]`` the length of the longest
    stop string that ends at ``n`` (through its failure links too), 0 for none.
    """
    goto: list[dict[str, int]] = [{}]
    depth, match = [0], [0]
    for s in stops:
        node = 0
        for ch in s:
            nxt = goto[node].get(ch)
            if nxt is None:
                nxt = len(goto)
                goto[node][ch] = nxt
                goto.append({})
                depth.append(depth[node] + 1)
                match.append(0)
            node = nxt
        match[node] = len(s)
    fail = [0] * len(goto)
    queue = collections.deque(goto[0].values())
    while queue:
        node = queue.popleft()
        for ch, child in goto[node].items():
            f = fail[node]
            while f and ch not in goto[f]:
                f = fail[f]
            fail[child] = goto[f].get(ch, 0) if goto[f].get(ch, 0) != child else 0
            match[child] = max(match[child], match[fail[child]])
            queue.append(child)
    return goto, fail, depth, match
