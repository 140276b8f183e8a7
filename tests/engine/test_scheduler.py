"""The scheduler alone, without a model: admission order, prefill budgets, chunking and row moves.

A fake forward pass stands in for the model runner: each cache row is a list of
token ids, a prefill pass writes prompt tokens at their positions, a decode pass
writes each sequence's last token, and row moves are applied as the real cache
applies them. After every step each running sequence must find exactly its own
tokens in its row, which is what keeps batched output equal to unbatched output.
"""

from __future__ import annotations

import random

import pytest

from chatstream.engine.sampling import SamplingParams
from chatstream.engine.scheduler import Chunk, Move, Scheduler
from chatstream.engine.sequence import Sequence, State


def seq(n_prompt: int, max_new: int = 5, base: int = 0) -> Sequence:
    s = Sequence([base + i for i in range(n_prompt)], SamplingParams(max_new_tokens=max_new), lambda e: None)
    return s


class FakeRunner:
    """Rows of token ids in place of keys and values; checks the layout rules the real cache relies on."""

    def __init__(self, max_batch: int):
        self.rows: list[list[int | None]] = [[] for _ in range(max_batch)]
        self.prefill_passes: list[list[tuple[Sequence, int, int]]] = []

    def _write(self, row: int, pos: int, token: int) -> None:
        cells = self.rows[row]
        cells.extend([None] * (pos + 1 - len(cells)))
        cells[pos] = token

    def prefill(self, chunks: list[Chunk]) -> None:
        rows = [c.seq.row for c in chunks]
        assert rows == list(range(rows[0], rows[0] + len(rows))), "a prefill batch is a contiguous run of rows"
        for c in chunks:
            assert c.seq.state is State.PREFILL and c.start == c.seq.length and c.count > 0
            for p in range(c.start, c.start + c.count):
                self._write(c.seq.row, p, c.seq.prompt_ids[p])
        self.prefill_passes.append([(c.seq, c.start, c.count) for c in chunks])

    def decode(self, batch: list[Sequence]) -> None:
        assert [s.row for s in batch] == list(range(len(batch))), "a decode batch is rows [0, n)"
        for s in batch:
            self._write(s.row, s.length, s.next_token)

    def apply(self, moves: list[Move]) -> None:
        for m in moves:
            src, dst = self.rows[m.src][:m.length], self.rows[m.dst][:m.length]
            self.rows[m.dst][:m.length] = src
            if m.swap:
                self.rows[m.src][:m.length] = dst

    def check(self, sched: Scheduler) -> None:
        running = sched.decoding + sched.prefilling
        assert sorted(s.row for s in running) == list(range(len(running)))
        assert [s.row for s in sched.decoding] == list(range(len(sched.decoding)))
        for s in running:
            want = (s.prompt_ids + s.generated)[:s.length]
            assert self.rows[s.row][:s.length] == want, f"row {s.row} lost its sequence's cache"


def token_for(s: Sequence) -> int:
    return 10_000 + 100 * s.prompt_ids[0] + len(s.generated)


def step(sched: Scheduler, runner: FakeRunner, finished: list[Sequence], keep: bool = False,
         on_admit=lambda s: None) -> None:
    """What Engine._step does, with the fake forward pass: prompt chunks and decoding rows in one pass.
    ``keep``: finished sequences keep their rows' positions (the prefix cache); ``on_admit(seq)`` runs for
    each admitted sequence before the pass (the engine loads its kept prefix there)."""
    for s in sched.admit():
        on_admit(s)
    chunks = sched.prefill_chunks()
    batch = sched.decode_batch()
    if chunks:
        runner.prefill(chunks)
    if batch:
        runner.decode(batch)
    done = sched.prefilled(chunks) if chunks else []
    if batch:
        sched.decoded(batch)
    for i in done:
        s = chunks[i].seq
        runner.apply(sched.promote(s))
        accept(sched, runner, s, finished, keep)
    for s in batch:
        accept(sched, runner, s, finished, keep)
    runner.check(sched)


def accept(sched, runner, s, finished, keep=False):
    s.generated.append(token_for(s))
    s.next_token = s.generated[-1]
    if len(s.generated) >= s.params.max_new_tokens:
        runner.apply(sched.remove(s, keep=keep))
        finished.append(s)


def test_admission_is_first_come_first_served_within_the_rows():
    sched = Scheduler(max_batch=2)
    a, b, c, d = (seq(4, base=i * 10) for i in range(4))
    for s in (a, b, c, d):
        sched.add(s)
    assert sched.admit() == [a, b]
    assert (a.row, b.row, a.state, c.state) == (0, 1, State.PREFILL, State.WAITING)
    assert sched.admit() == [] and sched.active == 2
    sched.remove(a)
    assert sched.admit() == [c]
    assert list(sched.waiting) == [d]


def test_prefill_budget_is_512_and_128_while_rows_decode():
    sched = Scheduler(max_batch=4, prefill_tokens=512, prefill_tokens_decoding=128)
    runner, finished = FakeRunner(4), []
    first, second = seq(300, max_new=50, base=0), seq(300, max_new=50, base=1)
    sched.add(first)
    sched.add(second)
    step(sched, runner, finished)
    # Nothing decodes yet: one pass of 512 tokens, the second prompt split after 212 of them.
    assert [(s, start, n) for s, start, n in runner.prefill_passes[0]] == [(first, 0, 300), (second, 0, 212)]
    assert first.state == State.DECODE and second.state == State.PREFILL
    third = seq(400, max_new=50, base=2)
    sched.add(third)
    step(sched, runner, finished)
    # A row decodes now: the pass takes at most 128 tokens, the rest of the second prompt first.
    assert runner.prefill_passes[1] == [(second, 212, 88), (third, 0, 40)]
    step(sched, runner, finished)
    assert runner.prefill_passes[2] == [(third, 40, 128)]
    assert all(sum(n for _, _, n in p) <= 128 for p in runner.prefill_passes[1:])


def test_a_long_prompt_is_chunked_and_then_decodes_each_step():
    sched = Scheduler(max_batch=2, prefill_tokens=512, prefill_tokens_decoding=128)
    runner, finished = FakeRunner(2), []
    long = seq(1200, max_new=3)
    sched.add(long)
    for _ in range(3):
        step(sched, runner, finished)
    assert [p[0][1:] for p in runner.prefill_passes] == [(0, 512), (512, 512), (1024, 176)]
    # The pass that completes the prompt samples the first token; each step after it decodes one more.
    assert long.state == State.DECODE and len(long.generated) == 1
    step(sched, runner, finished)
    assert len(long.generated) == 2 and not finished
    step(sched, runner, finished)
    assert finished == [long] and sched.active == 0 and not sched.has_work()


def test_promotion_swaps_rows_so_decoding_rows_stay_in_front():
    # Prefill batches go in row order, so the engine completes prompts in row order; if a later row ever
    # completes first, it still joins the decoding rows at row d, exchanging rows with the one there.
    sched = Scheduler(max_batch=3)
    big, small = seq(100, base=0), seq(10, base=1)
    sched.add(big)
    sched.add(small)
    sched.admit()
    big.length, small.length = 30, 10
    assert sched.promote(small) == [Move(1, 0, 30, swap=True)]
    assert (small.row, big.row, small.state, big.state) == (0, 1, State.DECODE, State.PREFILL)
    assert sched.prefill_chunks() == [Chunk(big, 30, 70)]


def test_removal_keeps_rows_contiguous_wherever_the_sequence_is():
    sched = Scheduler(max_batch=4, prefill_tokens=8, prefill_tokens_decoding=8)
    runner, finished = FakeRunner(4), []
    seqs = [seq(4, max_new=100, base=0), seq(4, max_new=100, base=1), seq(40, max_new=100, base=2),
            seq(40, max_new=100, base=3)]
    for s in seqs:
        sched.add(s)
    step(sched, runner, finished)
    step(sched, runner, finished)
    assert [s.state for s in seqs] == [State.DECODE, State.DECODE, State.PREFILL, State.PREFILL]
    moves = sched.remove(seqs[0])        # a decoding row: the last decoding row fills it, the last prefill row
    assert moves[0] == Move(1, 0, seqs[1].length)   # fills the hole left at row 1
    runner.apply(moves)
    runner.check(sched)
    runner.apply(sched.remove(seqs[2]))  # a prefilling row
    runner.check(sched)
    waiting = seq(4, base=9)
    sched.add(waiting)
    assert sched.remove(waiting) == [] and waiting.state == State.DONE and not sched.waiting
    step(sched, runner, finished)


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_never_mixes_up_rows(seed):
    # Arrivals, prompts of every size, early finishes and cancellations in any state, small budgets:
    # after every step every running sequence finds exactly its own tokens in its row.
    rng = random.Random(seed)
    max_batch = rng.choice([1, 2, 3, 5])
    sched = Scheduler(max_batch, prefill_tokens=rng.choice([7, 32, 512]), prefill_tokens_decoding=rng.choice([3, 16]))
    runner, finished, submitted = FakeRunner(max_batch), [], []
    for t in range(400):
        if t < 300 and rng.random() < 0.3:
            s = seq(rng.randint(1, 60), max_new=rng.randint(1, 25), base=len(submitted))
            submitted.append(s)
            sched.add(s)
        if rng.random() < 0.05 and sched.sequences():
            victim = rng.choice(sched.sequences())
            runner.apply(sched.remove(victim))
            finished.append(victim)
            runner.check(sched)
        if sched.has_work():
            step(sched, runner, finished)
    for _ in range(10_000):
        if not sched.has_work():
            break
        step(sched, runner, finished)
    assert not sched.has_work()
    assert sorted(map(id, finished)) == sorted(map(id, submitted))
    for s in finished:
        if len(s.generated) == s.params.max_new_tokens:
            assert s.generated == [10_000 + 100 * s.prompt_ids[0] + i for i in range(len(s.generated))]


def test_admission_order_is_arrival_order():
    sched = Scheduler(max_batch=1, prefill_tokens=512)
    runner, finished = FakeRunner(1), []
    seqs = [seq(5, max_new=2, base=i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        step(sched, runner, finished)
    assert finished == seqs
