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


def main() -> None:
    tree, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sys.path.insert(0, os.path.join(tree, "service"))
    import chatstream
    from chatstream import load_model
    from chatstream.engine import Engine, Failed, Finished, SamplingParams

    assert chatstream.__file__.startswith(os.path.abspath(tree)), chatstream.__file__
    model, tok = load_model("builtin:smollm2-135m-instruct")
    engine = Engine(model, tok, max_batch=32, max_context=2048, cpu_linear="onednn")
    engine.start()
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

    for i in range(clients):
        threading.Thread(target=client, args=(i,), daemon=True).start()
    time.sleep(8)
    with lock:
        tokens0, steps0, t0 = tokens[0], engine.steps, time.monotonic()
    time.sleep(seconds)
    with lock:
        tokens1, steps1, elapsed = tokens[0], engine.steps, time.monotonic() - t0
    print(f"{os.path.basename(os.path.abspath(tree))}: {clients} clients, {(tokens1 - tokens0) / elapsed:.1f} tok/s, "
          f"{(steps1 - steps0) / elapsed:.1f} steps/s", flush=True)
    stop.set()
    os._exit(0)  # the engine's thread and the clients are daemons; nothing to tidy


if __name__ == "__main__":
    main()
