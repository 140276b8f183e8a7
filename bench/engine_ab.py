"""Output tokens/s of one tree's `Engine`, without HTTP: for A/B runs of engine changes.

    .venv/bin/python bench/engine_ab.py TREE CLIENTS SECONDS

TREE is a checkout (its service/ is imported, so a `git worktree` of another commit
works with this venv). CLIENTS closed-loop submitters each send a random prompt of
40-120 token ids (seeded per submitter, the same in every tree), 64 new tokens,
greedy, and send the next as soon as one ends. After 8 s of warm-up it counts, over
SECONDS, the output tokens of the requests that finished and the engine's steps.
Run two trees alternately (A B A B): the host's speed drifts by about 10%.
"""

from __future__ import annotations

import os
import sys

from lib.engine import closed_loop


def main() -> None:
    tree, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sys.path.insert(0, os.path.join(tree, "service"))
    import chatstream
    from chatstream import load_model
    from chatstream.engine import Engine

    assert chatstream.__file__.startswith(os.path.abspath(tree)), chatstream.__file__
    model, tok = load_model("builtin:smollm2-135m-instruct")
    engine = Engine(model, tok, max_batch=32, max_context=2048, cpu_linear="onednn")
    engine.start()
    tok_s, steps_s = closed_loop(engine, clients, seconds)
    print(f"{os.path.basename(os.path.abspath(tree))}: {clients} clients, {tok_s:.1f} tok/s, "
          f"{steps_s:.1f} steps/s", flush=True)
    os._exit(0)  # the engine's thread is a daemon; nothing to tidy


if __name__ == "__main__":
    main()
