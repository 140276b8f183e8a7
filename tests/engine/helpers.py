"""What the engine tests share. Without a model: a fake runner inside a real :class:`Engine` (its
real scheduler, step and output processor; a fake tokenizer), see test_scheduler. On the real model:
a ModelRunner driven pass by pass, a started engine, prompts asked at once, and chat prompts."""

from __future__ import annotations

import contextlib
import types

import torch

from chatstream.engine import Collector, Engine, Failed, Finished, SamplingParams
from chatstream.engine.scheduler import Chunk, Move, Scheduler, StepPlan
from chatstream.engine.sequence import Sequence, State


class FakeTokenizer:
    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


class FakeRunner:
    """Rows of token ids in place of keys and values; checks the layout rules the real cache relies on.

    The token sampled for a sequence is :func:`token_for` it; a sequence in ``poisoned`` gets an exception
    instead (its sampling failed)."""

    def __init__(self, max_batch: int):
        self.rows: list[list[int | None]] = [[] for _ in range(max_batch)]
        self.prefill_passes: list[list[tuple[Sequence, int, int]]] = []
        self.poisoned: set[int] = set()
        self.scheduler: Scheduler | None = None  # set by Driver, for the checks

    def _write(self, row: int, pos: int, token: int) -> None:
        cells = self.rows[row]
        cells.extend([None] * (pos + 1 - len(cells)))
        cells[pos] = token

    # -- what the engine calls -------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        pass

    def new_generator(self, seed):
        return None

    def shrink(self) -> None:
        pass

    def execute(self, plan: StepPlan) -> list[int | Exception]:
        self.check()  # the rows were moved right before this pass
        assert plan.chunks or plan.decode
        assert [s.row for s in plan.decode] == list(range(len(plan.decode))), "a decode batch is rows [0, n)"
        for s in plan.decode:
            assert s.state is State.DECODE
            self._write(s.row, s.length, s.next_token)
        if plan.chunks:
            rows = [c.seq.row for c in plan.chunks]
            assert rows == list(range(rows[0], rows[0] + len(rows))), "a prefill batch is a contiguous run of rows"
            assert rows[0] == len(plan.decode), "the prompt chunks come right after the decoding rows"
        for c in plan.chunks:
            assert c.seq.state is State.PREFILL and c.start == c.seq.length and c.count > 0
            for p in range(c.start, c.start + c.count):
                self._write(c.seq.row, p, c.seq.prompt_ids[p])
        if plan.chunks:
            self.prefill_passes.append([(c.seq, c.start, c.count) for c in plan.chunks])
        return [RuntimeError("poisoned") if id(s) in self.poisoned else token_for(s) for s in plan.sampled]

    def apply(self, moves: list[Move]) -> None:
        for m in moves:
            src, dst = self.rows[m.src][:m.length], self.rows[m.dst][:m.length]
            self.rows[m.dst][:m.length] = src
            if m.swap:
                self.rows[m.src][:m.length] = dst

    def check(self) -> None:
        sched = self.scheduler
        running = sched.decoding + sched.prefilling
        assert sorted(s.row for s in running) == list(range(len(running)))
        assert [s.row for s in sched.decoding] == list(range(len(sched.decoding)))
        for s in running:
            want = (s.prompt_ids + s.generated)[:s.length]
            assert self.rows[s.row][:s.length] == want, f"row {s.row} lost its sequence's cache"


def token_for(s: Sequence) -> int:
    return 10_000 + 100 * s.prompt_ids[0] + len(s.generated)


class Driver:
    """A real engine (never started) around a fake runner: submit, step, and the sequences that ended."""

    def __init__(self, max_batch: int, prefill_tokens: int = 512, prefill_tokens_decoding: int = 128,
                 prefix_cache_tokens: int = 0, runner: FakeRunner | None = None):
        self.runner = runner or FakeRunner(max_batch)
        self.engine = Engine(None, FakeTokenizer(), max_batch=max_batch, max_context=4096,
                             prefill_tokens=prefill_tokens, prefill_tokens_decoding=prefill_tokens_decoding,
                             eos_token_ids=[], prefix_cache_tokens=prefix_cache_tokens, runner=self.runner)
        self.scheduler = self.runner.scheduler = self.engine.scheduler
        self.finished: list[Sequence] = []
        self.ends: dict[int, object] = {}

    def submit(self, n_prompt: int = 4, max_new: int = 5, base: int = 0, prompt: list[int] | None = None) -> Sequence:
        box: list[Sequence] = []

        def on_event(event):
            if isinstance(event, (Finished, Failed)):
                assert id(box[0]) not in self.ends, "a sequence ended twice"
                self.ends[id(box[0])] = event
                self.finished.append(box[0])
        ids = prompt if prompt is not None else [base + i for i in range(n_prompt)]
        box.append(self.engine.submit(ids, SamplingParams(max_new_tokens=max_new), on_event))
        return box[0]

    def step(self) -> bool:
        ran = self.engine.step()
        self.runner.check()
        return ran

    def end_one_at_random(self, rng, chance: float) -> None:
        """With probability ``chance``, one live sequence ends: cancelled, or its sampling fails."""
        live = self.scheduler.sequences()
        if rng.random() < chance and live:
            victim = rng.choice(live)
            if rng.random() < 0.5:
                self.engine.cancel(victim)              # ends: what it computed may be kept
            else:
                self.runner.poisoned.add(id(victim))    # fails: nothing is kept

    def run_out(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("the engine never ran out of work")


# -- the real model ------------------------------------------------------------------------------------------

def seq(ids, row):
    """What the runner reads of a sequence, for driving a ModelRunner without the engine."""
    return types.SimpleNamespace(prompt_ids=ids, row=row, length=0, next_token=None)


def forward_passes(runner, prompts, rows_decoding=6) -> list:
    """Prefill ``prompts`` in two chunked passes (ragged, right-aligned), then decode; every pass's logits."""
    seqs = [seq(ids, row) for row, ids in enumerate(prompts)]
    out = []
    with torch.inference_mode():
        runner.reserve(max(len(p) for p in prompts) + rows_decoding + 1)
        half = [len(p) // 2 for p in prompts]
        out.append(runner.prefill([Chunk(s, 0, h) for s, h in zip(seqs, half)]))
        out.append(runner.prefill([Chunk(s, h, len(s.prompt_ids) - h) for s, h in zip(seqs, half)]))
        for s in seqs:
            s.length = len(s.prompt_ids)
        logits = out[-1]
        for _ in range(rows_decoding):
            for s, row in zip(seqs, logits):
                s.next_token = int(row.argmax())
            logits = runner.decode(seqs)
            for s in seqs:
                s.length += 1
            out.append(logits)
    return out


@contextlib.contextmanager
def running(model_and_tokenizer, **options):
    """A started engine on the real model (4 rows, 512 tokens of context and prefill budgets of 48 and 16
    tokens unless ``options`` say otherwise), stopped after the block."""
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, **{"max_batch": 4, "max_context": 512, "prefill_tokens": 48,
                                   "prefill_tokens_decoding": 16, **options})
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def ask(engine, prompts: list[list[int]], timeout: float = 180, **params) -> list[Collector]:
    """Every prompt submitted at once (greedy, 20 new tokens unless `params` say otherwise), all awaited."""
    outs = []
    for ids in prompts:
        c = Collector()
        engine.submit(ids, SamplingParams(**{"max_new_tokens": 20, "temperature": 0, **params}), c)
        outs.append(c)
    for c in outs:
        assert c.done.wait(timeout)
    return outs


def prompt(tok, text):
    return tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 2+2?",
             "Name three colors.", "Who wrote Hamlet?", "What is the largest planet?"]
