"""The scheduler and the engine's real step, without a model: admission order, prefill budgets, chunking, row moves.

A fake runner (helpers.py) stands in for the model runner inside a real :class:`Engine` (its real scheduler, step
and output processor; a fake tokenizer): each cache row is a list of token ids, a pass writes each chunk's prompt
tokens at their positions and each decoding row's last token, and row moves are applied as the real cache applies
them. Before every pass and after every step each running sequence must find exactly its own tokens in its row,
which is what keeps batched output equal to unbatched output.
"""

from __future__ import annotations

import random

import pytest

from chatstream.engine import Failed, Finished, SamplingParams
from chatstream.engine.scheduler import Chunk, Move, Scheduler, StepPlan
from chatstream.engine.sequence import Sequence, State

from .helpers import Driver


def queued(sched: Scheduler, n: int) -> list[Sequence]:
    """`n` sequences of four prompt tokens each, added to the scheduler in order."""
    seqs = [Sequence([i * 10 + j for j in range(4)], SamplingParams(), lambda e: None) for i in range(n)]
    for s in seqs:
        sched.add(s)
    return seqs


def test_admission_is_first_come_first_served_within_the_rows():
    sched = Scheduler(max_batch=2)
    a, b, c, d = queued(sched, 4)
    assert sched.schedule().admitted == [a, b]
    assert (a.row, b.row, a.state, c.state) == (0, 1, State.PREFILL, State.WAITING)
    assert sched.schedule().admitted == [] and sched.active == 2
    sched.remove(a)
    assert sched.schedule().admitted == [c]
    assert list(sched.waiting) == [d]


def test_a_sequence_whose_preparation_raises_is_refused_and_its_row_stays_free_for_the_step():
    sched = Scheduler(max_batch=3)
    a, b, c, d = queued(sched, 4)

    def prepare(seq):
        if seq is b:
            raise RuntimeError("no room")
    plan = sched.schedule(prepare)
    assert plan.admitted == [a, c] and plan.refused[0][0] is b and b.state is State.DONE
    assert (a.row, c.row) == (0, 1) and [ch.seq for ch in plan.chunks] == [a, c]
    assert list(sched.waiting) == [d] and sched.schedule().admitted == [d]


def test_prefill_budget_is_512_and_128_while_rows_decode():
    drv = Driver(max_batch=4, prefill_tokens=512, prefill_tokens_decoding=128)
    first, second = drv.submit(300, max_new=50, base=0), drv.submit(300, max_new=50, base=1)
    drv.step()
    # Nothing decodes yet: one pass of 512 tokens, the second prompt split after 212 of them.
    assert drv.runner.prefill_passes[0] == [(first, 0, 300), (second, 0, 212)]
    assert first.state is State.DECODE and second.state is State.PREFILL
    third = drv.submit(400, max_new=50, base=2)
    drv.step()
    # A row decodes now: the pass takes at most 128 tokens, the rest of the second prompt first.
    assert drv.runner.prefill_passes[1] == [(second, 212, 88), (third, 0, 40)]
    drv.step()
    assert drv.runner.prefill_passes[2] == [(third, 40, 128)]
    assert all(sum(n for _, _, n in p) <= 128 for p in drv.runner.prefill_passes[1:])


def test_a_long_prompt_is_chunked_and_then_decodes_each_step():
    drv = Driver(max_batch=2, prefill_tokens=512, prefill_tokens_decoding=128)
    long = drv.submit(1200, max_new=3)
    for _ in range(3):
        drv.step()
    assert [p[0][1:] for p in drv.runner.prefill_passes] == [(0, 512), (512, 512), (1024, 176)]
    # The pass that completes the prompt samples the first token; each step after it decodes one more.
    assert long.state is State.DECODE and len(long.generated) == 1
    drv.step()
    assert len(long.generated) == 2 and not drv.finished
    drv.step()
    assert drv.finished == [long] and drv.ends[id(long)].reason == "length"
    assert drv.scheduler.active == 0 and not drv.scheduler.has_work() and not drv.step()


def test_promotion_swaps_rows_so_decoding_rows_stay_in_front():
    # Prefill batches go in row order, so the engine completes prompts in row order; if a later row ever
    # completes first, it still joins the decoding rows at row d, exchanging rows with the one there.
    sched = Scheduler(max_batch=3)
    big, small = (Sequence(list(range(n)), SamplingParams(), lambda e: None) for n in (100, 10))
    sched.add(big)
    sched.add(small)
    sched.schedule()
    big.length = 30
    assert sched.update(StepPlan([], [], [Chunk(small, 0, 10)], [])) == [Move(1, 0, 30, swap=True)]
    assert (small.row, big.row, small.state, big.state) == (0, 1, State.DECODE, State.PREFILL)
    assert sched.schedule().chunks == [Chunk(big, 30, 70)]


def test_removal_keeps_rows_contiguous_wherever_the_sequence_is():
    drv = Driver(max_batch=4, prefill_tokens=8, prefill_tokens_decoding=8)
    seqs = [drv.submit(4, max_new=100, base=0), drv.submit(4, max_new=100, base=1),
            drv.submit(40, max_new=100, base=2), drv.submit(40, max_new=100, base=3)]
    drv.step()
    drv.step()
    assert [s.state for s in seqs] == [State.DECODE, State.DECODE, State.PREFILL, State.PREFILL]
    # A decoding row: the last decoding row fills it, and the last prefilling row fills the hole at row 1.
    moves = drv.scheduler.remove(seqs[0])
    assert moves[0] == Move(1, 0, seqs[1].length)
    drv.runner.apply(moves)
    drv.runner.check()
    drv.engine.cancel(seqs[2])          # a prefilling row, through the engine: ended before the next pass
    waiting = drv.submit(4, base=9)
    drv.engine.cancel(waiting)          # still waiting
    drv.step()
    assert {id(s) for s in drv.finished} == {id(seqs[2]), id(waiting)}
    assert drv.ends[id(waiting)].reason == drv.ends[id(seqs[2])].reason == "cancelled"
    assert waiting.state is State.DONE and not drv.scheduler.waiting and drv.scheduler.active == 2


def test_a_failed_sampling_or_forward_pass_fails_only_its_sequences():
    drv = Driver(max_batch=3, prefill_tokens=16, prefill_tokens_decoding=4)
    a, b = drv.submit(4, max_new=6, base=0), drv.submit(4, max_new=6, base=1)
    drv.step()
    drv.runner.poisoned.add(id(a))
    drv.step()
    assert drv.finished == [a] and isinstance(drv.ends[id(a)], Failed) and b.state is State.DECODE
    late = drv.submit(30, max_new=6, base=2)   # prefills in chunks of 4 beside b
    drv.step()
    failing = drv.runner.execute

    def broken(plan):
        raise RuntimeError("injected")
    drv.runner.execute = broken
    drv.step()
    drv.runner.execute = failing
    assert {id(s) for s in drv.finished} == {id(a), id(b), id(late)}
    assert all(isinstance(drv.ends[id(s)], Failed) for s in (b, late)) and not drv.scheduler.has_work()
    after = drv.submit(5, max_new=3, base=3)
    drv.run_out()
    assert after.generated == [token_for_index(after, i) for i in range(3)]


def token_for_index(s: Sequence, i: int) -> int:
    return 10_000 + 100 * s.prompt_ids[0] + i


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_never_mixes_up_rows(seed):
    # Arrivals, prompts of every size, cancellations in any state and failed samplings, small budgets:
    # before every pass and after every step every running sequence finds exactly its own tokens in its row.
    rng = random.Random(seed)
    max_batch = rng.choice([1, 2, 3, 5])
    drv = Driver(max_batch, prefill_tokens=rng.choice([7, 32, 512]), prefill_tokens_decoding=rng.choice([3, 16]))
    submitted = []
    for t in range(400):
        if t < 300 and rng.random() < 0.3:
            submitted.append(drv.submit(rng.randint(1, 60), max_new=rng.randint(1, 25), base=len(submitted)))
        drv.end_one_at_random(rng, 0.05)
        drv.step()
    drv.run_out()
    assert sorted(map(id, drv.finished)) == sorted(map(id, submitted))
    for s in drv.finished:
        end = drv.ends[id(s)]
        if isinstance(end, Finished) and end.reason == "length":
            assert s.generated == [token_for_index(s, i) for i in range(s.params.max_new_tokens)]


def test_admission_order_is_arrival_order():
    drv = Driver(max_batch=1, prefill_tokens=512)
    seqs = [drv.submit(5, max_new=2, base=i) for i in range(5)]
    drv.run_out()
    assert drv.finished == seqs
