"""This project's engine driven in-process, without HTTP: greedy answers and closed-loop load.

chatstream is imported inside the functions, so a script may first choose which tree's
service/ it serves (engine_ab.py: another commit's).
"""

from __future__ import annotations

import random
import threading
import time


def chat_ids(tok, messages) -> list[int]:
    from chatstream.render import encode_chat
    return encode_chat(tok, messages, add_generation_prompt=True)


def submit_all(engine, prompts: list[list[int]], max_new_tokens: int) -> list:
    """Every prompt submitted at once, greedy (they batch when the engine has rows): their Collectors."""
    from chatstream.engine import Collector, SamplingParams
    outs = []
    for ids in prompts:
        c = Collector()
        engine.submit(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0), c)
        outs.append(c)
    return outs


def generate(engine, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers; all prompts submitted at once (they batch when the engine has rows)."""
    outs = submit_all(engine, prompts, max_new_tokens)
    for c in outs:
        assert c.done.wait(600), "the engine did not answer"
        assert c.end is not None and type(c.end).__name__ == "Finished", c.end
    return [c.text for c in outs]


def alone(engine, prompts, max_new_tokens):
    return [generate(engine, [p], max_new_tokens)[0] for p in prompts]


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
