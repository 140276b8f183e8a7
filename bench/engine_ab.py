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
import random
import sys
import threading
import time


def closed_loop(engine, clients: int, seconds: float, warmup: float = 8.0) -> tuple[float, float]:
    """Output tokens/s and engine steps/s of ``clients`` closed-loop submitters over ``seconds`` after
    ``warmup``. Each sends a random prompt of 40-120 token ids (seeded per submitter), 64 new tokens,
    greedy, and the next as soon as one ends; only requests that finished count. They stop before it
    returns, so one engine can be measured at several levels."""
    from chatstream.engine import Failed, Finished, SamplingParams

    lock, tokens, stop = threading.Lock(), [0], threading.Event()

    def client(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            prompt = [rng.randrange(1000, 40000) for _ in range(rng.randrange(40, 120))]
            done = threading.Event()
            seq = engine.submit(prompt, SamplingParams(max_new_tokens=64, temperature=0),
                                lambda e: isinstance(e, (Finished, Failed)) and done.set())
            done.wait()
            with lock:
                tokens[0] += len(seq.generated)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    with lock:
        tokens0, steps0, t0 = tokens[0], engine.steps, time.monotonic()
    time.sleep(seconds)
    with lock:
        tokens1, steps1, elapsed = tokens[0], engine.steps, time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join()
    return (tokens1 - tokens0) / elapsed, (steps1 - steps0) / elapsed


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
