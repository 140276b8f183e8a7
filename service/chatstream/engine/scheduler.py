"""Which sequences run in the next forward passes, and where their cache rows are.

A pure object: no model, no tensors, no thread. A step is two calls, as in
vLLM's ``schedule()`` / ``update_from_output()``: :meth:`Scheduler.schedule`
admits and returns the :class:`StepPlan` of one forward pass, and, once the
runner has run it, :meth:`Scheduler.update` advances the sequences and answers
with the row moves the cache must make (:class:`Move`), which the runner
applies. Sequences come in through :meth:`~Scheduler.add` and leave through
:meth:`~Scheduler.remove` (finished, cancelled or failed; the output processor
decides when a sequence ends). Its rules:

- Waiting sequences are admitted first come, first served while a row is free.
- Rows ``[0, d)`` hold the decoding sequences, rows ``[d, d + p)`` the ones still
  prefilling, so a decode batch is the plain slice ``[0, d)`` and a prefill batch
  a contiguous run of rows.
- One prefill pass takes at most ``prefill_tokens`` prompt tokens (512), or
  ``prefill_tokens_decoding`` (128) while any row decodes: a prefill pass stalls
  every decoding row, so it is kept short while someone is waiting for tokens.
  Sequences are served in row order; a prompt longer than the budget is split
  across passes (chunked prefill).
- A sequence whose prompt is complete is promoted to row ``d`` (swapping with
  the prefilling sequence there); a finished one is replaced by the last
  decoding row, and the hole left at the end of the decoding rows, or in the
  prefilling rows, is filled by the last prefilling row.
- With a prefix cache (``prefix_cache_tokens`` > 0, prefix_cache.py) a sequence
  that ends keeps its row's positions, and an admitted prompt that begins with
  kept tokens starts at that length: only the rest is prefilled.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

from .prefix_cache import Drop, PrefixIndex, Save
from .sequence import Sequence, State


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``[start, start + count)`` of ``seq`` go through the next prefill pass."""
    seq: Sequence
    start: int
    count: int

    @property
    def completes(self) -> bool:
        """The chunk ends its prompt: the logits at its last token pick the sequence's first new token."""
        return self.start + self.count == len(self.seq.prompt_ids)


@dataclass(frozen=True)
class StepPlan:
    """One step: who was admitted before it, and what its forward pass runs."""
    admitted: list[Sequence]                   # given a row (and prepared) this step
    refused: list[tuple[Sequence, Exception]]  # given a row, but preparing them raised: out, to be failed
    chunks: list[Chunk]                        # prompt chunks, in row order, rows contiguous after the decoding ones
    decode: list[Sequence]                     # the decoding rows [0, d) in order, each writing its next_token

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.decode

    @property
    def running(self) -> list[Sequence]:
        """The sequences the pass writes for."""
        return [c.seq for c in self.chunks] + self.decode

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token from the pass: completed prompts (chunk order), then the decoding rows."""
        return [c.seq for c in self.chunks if c.completes] + self.decode


@dataclass(frozen=True)
class Move:
    """Copy the first ``length`` positions of cache row ``src`` into row ``dst`` (exchange them if ``swap``)."""
    src: int
    dst: int
    length: int
    swap: bool = False


class Scheduler:
    def __init__(self, max_batch: int, prefill_tokens: int = 512, prefill_tokens_decoding: int = 128,
                 prefix_cache_tokens: int = 0):
        if max_batch < 1 or prefill_tokens < 1 or prefill_tokens_decoding < 1:
            raise ValueError("max_batch and the prefill budgets must be at least 1")
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.prefill_tokens_decoding = min(prefill_tokens, prefill_tokens_decoding)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.decoding: list[Sequence] = []     # rows [0, d), in row order
        self.prefilling: list[Sequence] = []   # rows [d, d + p), in no particular order
        self.prefixes = PrefixIndex(prefix_cache_tokens) if prefix_cache_tokens > 0 else None

    # -- what there is ------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Sequences holding a row."""
        return len(self.decoding) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.prefilling)

    def sequences(self) -> list[Sequence]:
        """Every sequence the scheduler holds, waiting or running."""
        return list(self.waiting) + self.decoding + self.prefilling

    # -- a step -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.state = State.WAITING
        self.waiting.append(seq)

    def schedule(self, prepare: Callable[[Sequence], None] = lambda seq: None) -> StepPlan:
        """Plan the next step: admit waiting sequences to the rows free now, oldest first, then take the
        prompt chunks under the token budget and every decoding row.

        ``prepare(seq)`` readies each admitted sequence before any pass (the engine reserves its cache,
        loads its kept prefix, starts its text). One whose preparation raises takes no part: it leaves
        (``State.DONE``; it held the last row, so nothing moves) and is listed in ``refused``, and its row
        stays free until the next step.
        """
        admitted, refused = [], []
        for _ in range(min(len(self.waiting), self.max_batch - self.active)):
            seq = self.waiting.popleft()
            seq.row, seq.state, seq.length = self.active, State.PREFILL, 0
            if self.prefixes is not None:
                seq.prefix_key, seq.cached_tokens = self.prefixes.lookup(seq.prompt_ids)
                seq.length = seq.cached_tokens
            self.prefilling.append(seq)
            try:
                prepare(seq)
            except Exception as exc:
                self.prefilling.pop()
                seq.state, seq.row = State.DONE, -1
                refused.append((seq, exc))
                continue
            admitted.append(seq)
        return StepPlan(admitted, refused, self._chunks(), list(self.decoding))

    def _chunks(self) -> list[Chunk]:
        """Prompt chunks in row order within the token budget (the prefilling rows are contiguous)."""
        budget = self.prefill_tokens_decoding if self.decoding else self.prefill_tokens
        chunks: list[Chunk] = []
        for seq in sorted(self.prefilling, key=lambda s: s.row):
            if budget <= 0:
                break
            count = min(len(seq.prompt_ids) - seq.length, budget)
            chunks.append(Chunk(seq, seq.length, count))
            budget -= count
        return chunks

    def update(self, plan: StepPlan) -> list[Move]:
        """The pass over ``plan`` ran: its positions are in the cache. Advance every sequence it wrote for,
        then promote each completed prompt to the decoding rows; return the row moves, in order.

        Every sequence advances before any row moves: a promotion exchanges two rows up to the longer of the
        two, which must count the positions this pass wrote.
        """
        for chunk in plan.chunks:
            chunk.seq.length = chunk.start + chunk.count
        for seq in plan.decode:
            seq.length += 1
        moves: list[Move] = []
        for chunk in plan.chunks:
            if chunk.completes:
                moves.extend(self._promote(chunk.seq))
        return moves

    # -- rows ---------------------------------------------------------------------------------
    def _promote(self, seq: Sequence) -> list[Move]:
        """A sequence whose prompt is complete joins the decoding rows at row ``d``."""
        d = len(self.decoding)
        moves = []
        other = next((s for s in self.prefilling if s.row == d), None)
        if other is not None and other is not seq:
            moves.append(Move(seq.row, d, max(seq.length, other.length), swap=True))
            other.row = seq.row
        seq.row = d
        self.prefilling.remove(seq)
        self.decoding.append(seq)
        seq.state = State.DECODE
        return moves

    def remove(self, seq: Sequence, keep: bool = False) -> list[Move | Save | Drop]:
        """Take ``seq`` out wherever it is (it is done); rows stay contiguous.

        With ``keep`` (the sequence ended, it did not fail) and a prefix cache, its row's positions are kept:
        the evicted entries' :class:`Drop` orders, then a :class:`Save`, come before any move of the rows.
        """
        state, seq.state = seq.state, State.DONE
        if state is State.WAITING:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return []
        if state not in (State.PREFILL, State.DECODE):
            return []
        moves: list[Move | Save | Drop] = []
        if keep and self.prefixes is not None and seq.length > 0:
            key, drops = self.prefixes.insert((seq.prompt_ids + seq.generated)[:seq.length])
            moves.extend(Drop(k) for k in drops)  # memory is given back before more is taken
            if key is not None:
                moves.append(Save(seq.row, seq.length, key))
        if state is State.DECODE:
            last = self.decoding[-1]
            if last is not seq:
                moves.append(Move(last.row, seq.row, last.length))
                last.row = seq.row
                self.decoding[self.decoding.index(seq)] = last
            self.decoding.pop()
            free = len(self.decoding)
        else:
            self.prefilling.remove(seq)
            free = seq.row
        tail = max(self.prefilling, key=lambda s: s.row, default=None)
        if tail is not None and tail.row > free:
            moves.append(Move(tail.row, free, tail.length))
            tail.row = free
        seq.row = -1
        return moves

    def clear(self) -> list[Sequence]:
        """Drop every sequence (after an engine fault); return the running ones."""
        running = self.decoding + self.prefilling
        for seq in running:
            seq.state = State.DONE
            seq.row = -1
        self.decoding, self.prefilling = [], []
        return running
