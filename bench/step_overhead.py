"""The engine's own cost per step, without a model: scheduler, step and output processor around a runner
that does no work (16 sequences decoding, a new 60-token prompt whenever one ends).

    .venv/bin/python bench/step_overhead.py TREE [STEPS]

TREE is a checkout (its service/ is imported, so a `git worktree` of another commit works with this venv;
bench/compare_commits.py leaves them under bench/.peers/ab/). The runner is swapped in for ModelRunner
where loop.py builds it, so trees before and after the step redesign (issue 20) run the same loop:
``_drain_inbox``, ``_reap_cancelled``, ``_step``. Prints microseconds per step, after 2000 steps of warm-up.
Run two trees alternately: the figure is a few tens of microseconds and the host's noise is of that order.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    tree, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30_000
    sys.path.insert(0, os.path.join(tree, "service"))
    import torch

    import chatstream
    from chatstream.engine import SamplingParams, loop
    from chatstream.engine.runner import ModelRunner

    assert chatstream.__file__.startswith(os.path.abspath(tree)), chatstream.__file__

    class Tokenizer:
        def decode(self, ids, **_):
            return "x" * len(ids)

    class IdleRunner:
        device = torch.device("cpu")

        def reserve(self, length): pass
        def load(self, row, key, length): pass
        def new_generator(self, seed): return None
        def shrink(self): pass
        def apply(self, orders): pass

        def step(self, chunks, batch):
            return (torch.zeros(len(chunks), 8) if chunks else None, torch.zeros(len(batch), 8) if batch else None)

        def sample(self, logits, seqs):
            return [1000 + len(s.generated) for s in seqs]

        if hasattr(ModelRunner, "execute"):  # after the redesign: the real execute over step and sample
            execute = ModelRunner.execute

    loop.ModelRunner = lambda model, max_batch: IdleRunner()
    engine = loop.Engine(None, Tokenizer(), max_batch=32, max_context=4096, eos_token_ids=[])
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        submitted += 1
        engine.submit([submitted] * 60, SamplingParams(max_new_tokens=64, temperature=0), lambda event: None)

    for _ in range(16):
        submit()
    warmup, start = 2000, 0.0
    with torch.inference_mode():
        for k in range(warmup + steps):
            engine._drain_inbox()
            engine._reap_cancelled()
            if engine.scheduler.active < 16:
                submit()
            if k == warmup:
                start = time.perf_counter()
            engine._step()
    elapsed = time.perf_counter() - start
    print(f"{os.path.basename(os.path.abspath(tree))}: {elapsed / steps * 1e6:.1f} us per step", flush=True)


if __name__ == "__main__":
    main()
