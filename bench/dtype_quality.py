"""bfloat16 against float32 on the CPU: what a user would notice, and what it buys.

    .venv/bin/python bench/dtype_quality.py [--model builtin:smollm2-135m-instruct] [--out bench/results]

The evidence behind `--dtype auto` on CPUs with native bfloat16 (AVX-512 BF16 or AMX),
measured through this project's engine (the serving path: its kernels, its batching, its
prefix cache), one dtype after the other, in one run:

1. facts: greedy answers to questions with one right answer (a keyword), per dtype;
2. agreement: greedy 64-token answers to 16 open questions in bfloat16 against the
   float32 answers (identical answers, and the tokens they share before they part);
3. perplexity of a fixed English text (bench/data/quality_text.txt, written for this
   file) and of the float32 model's own answers, per dtype;
4. invariance: in each configuration (float32; bfloat16 linear layers, the engine's
   ``--cpu-linear bfloat16``, with its batch-invariant attention; the whole model in bfloat16), the answers alone, in a batch of 8, and as a conversation's
   second turn read from the prefix cache against the same turn prefilled afresh. The
   project promises that batching and the cache never change a greedy answer;
5. speed: decode tokens/s of one stream and of 8 streams, per dtype, with the ratio.

It prints the tables, the CPU and its bfloat16 flags, and writes
bench/results/<date>-dtype-quality.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path

from lib.conversations import FOLLOW_UPS, OPENERS
from lib.engine import alone, chat_ids, generate, submit_all
from lib.host import BENCH, cpu_description, sh
from lib.results import write_results

FACTS = [
    ("What is the capital of France?", ["paris"]),
    ("What is 2+2?", ["4", "four"]),
    ("Who wrote Hamlet?", ["shakespeare"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("At what temperature in Celsius does water boil at sea level?", ["100"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("What is the chemical formula of water?", ["h2o", "h₂o"]),
    ("Who was the first president of the United States?", ["washington"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("What language is mainly spoken in Brazil?", ["portuguese"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What gas do plants take in from the air to make food?", ["carbon dioxide", "co2"]),
    ("What is the fastest land animal?", ["cheetah"]),
    ("How many continents are there?", ["7", "seven"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("What is the capital of Germany?", ["berlin"]),
]


def nll(runner, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` and the token count, through the pass the engine
    serves (``runner``: a ModelRunner over the engine's prepared model, in its mode)."""
    import torch
    with torch.inference_mode():
        logp = torch.log_softmax(runner.logits_of(ids[:-1]).float(), dim=-1)
        target = torch.tensor(ids[1:])
        return -logp.gather(1, target[:, None]).sum().item(), len(ids) - 1


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decode_rate(engine, tok, streams: int, new_tokens: int = 64) -> float:
    prompts = [chat_ids(tok, [{"role": "user", "content": OPENERS[i % len(OPENERS)] + f" ({i})"}])
               for i in range(streams)]
    generate(engine, prompts[:1], 8)  # warm
    t0 = time.perf_counter()
    outs = submit_all(engine, prompts, new_tokens)
    for c in outs:
        c.done.wait(600)
    seconds = time.perf_counter() - t0
    return sum(c.end.completion_tokens for c in outs) / seconds


def evaluate(source: str, dtype: str, new_tokens: int, reference: dict | None, linear: str = "float32",
             cpu_linear: str = "auto") -> dict:
    """``linear``: the engine's ``linear_dtype`` (bfloat16: a float32 model's products in bfloat16);
    ``cpu_linear`` "int8": those products from int8 weights (AMX)."""
    import torch

    from chatstream import load_model
    from chatstream.engine import Engine, native
    from chatstream.engine.runner import ModelRunner

    model, tok = load_model(source, device="cpu", dtype=dtype)
    text_ids = tok(Path(BENCH / "data" / "quality_text.txt").read_text())["input_ids"]
    engine = Engine(model, tok, max_batch=8, max_context=2048, cpu_linear=cpu_linear, prefix_cache_tokens=0,
                    linear_dtype=linear)
    engine.start()
    # After start, over the model as the engine prepared it, and in the engine's mode: the pass it serves.
    runner = ModelRunner(model, 1)
    if engine.linear_dtype == "bfloat16":  # and the keys and values the engine keeps (int8 in the int8 mode)
        runner.serve_invariant(engine.runner.cache.dtype or torch.bfloat16)
    text_nll, text_n = nll(runner, text_ids)
    kernel = "amx" if engine.linear_dtype == "bfloat16" and native.amx_linear() else engine.cpu_linear
    kernel += ", int8 weights" if engine.int8_weights else ""
    kernel += f", {engine.info['kv_cache']} keys and values"
    out: dict = {"dtype": engine.info["dtype"], "cpu_linear": kernel, "linear_dtype": engine.linear_dtype}
    try:
        fact_prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q, _ in FACTS]
        fact_answers = alone(engine, fact_prompts, 32)
        out["facts"] = [any(k in a.lower() for k in keys) for a, (_, keys) in zip(fact_answers, FACTS)]
        out["fact_answers"] = fact_answers

        open_prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in OPENERS]
        answers = alone(engine, open_prompts, new_tokens)
        out["answers"] = answers
        out["batched_equal"] = sum(a == b for a, b in zip(answers, generate(engine, open_prompts[:8], new_tokens)))

        # The same second turns, prefilled whole (this engine has no prefix cache) and read from a cache.
        second = [chat_ids(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                 {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}])
                  for i, (q, a) in enumerate(zip(OPENERS[:8], answers[:8]))]
        fresh = alone(engine, second, new_tokens)
        cached_engine = Engine(model, tok, max_batch=8, max_context=2048, cpu_linear=cpu_linear,
                               prefix_cache_tokens=16384, linear_dtype=linear)
        cached_engine.start()
        try:
            alone(cached_engine, open_prompts[:8], new_tokens)  # turn 1 fills the cache
            hits = alone(cached_engine, second, new_tokens)
            stats = cached_engine.prefix_cache_stats
        finally:
            cached_engine.stop()
        out["cache_equal"] = sum(a == b for a, b in zip(fresh, hits))
        out["cache_hit_rate"] = stats["cached_tokens"] / max(1, stats["prompt_tokens"])

        ref_answers = reference["answers"] if reference else answers
        answer_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in ref_answers]
        own = [nll(runner, p + a) for p, a in zip(open_prompts, answer_ids)]
        # Only the answer tokens count: subtract the prompt's own NLL.
        prompt_part = [nll(runner, p) for p in open_prompts]
        answer_nll = sum(o[0] - p[0] for o, p in zip(own, prompt_part))
        answer_n = sum(len(a) for a in answer_ids)
        out["perplexity_text"] = math.exp(text_nll / text_n)
        out["perplexity_fp32_answers"] = math.exp(answer_nll / answer_n)
        out["text_tokens"], out["answer_tokens"] = text_n, answer_n
        if reference:
            ref_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in reference["answers"]]
            mine = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
            out["equal_to_fp32"] = sum(a == b for a, b in zip(answers, reference["answers"]))
            out["shared_tokens_with_fp32"] = [shared_prefix(a, b) for a, b in zip(mine, ref_ids)]
        out["tok_s_1"] = decode_rate(engine, tok, 1)
        out["tok_s_8"] = decode_rate(engine, tok, 8)
    finally:
        engine.stop()
        del model
    torch.set_num_threads(torch.get_num_threads())
    return out


# What `--cpu-linear bfloat16` must keep against float32 to be worth serving (printed with the tables).
BOUND = {"perplexity": 0.01, "facts": 1}


def verdict(f32: dict, other: dict) -> str:
    """Whether ``other`` is within :data:`BOUND` of float32 and keeps the batch and cache promise."""
    n = len(OPENERS[:8])
    checks = [
        (other["perplexity_text"] <= f32["perplexity_text"] * (1 + BOUND["perplexity"]),
         f"perplexity within +{BOUND['perplexity']:.0%} of float32's"),
        (sum(other["facts"]) >= sum(f32["facts"]) - BOUND["facts"], f"at most {BOUND['facts']} fact fewer"),
        (other["batched_equal"] == n, f"answers alone = batched, {n} of {n}"),
        (other["cache_equal"] == n, f"prefix cache = fresh, {n} of {n}"),
    ]
    failed = [what for ok, what in checks if not ok]
    return ("PASSES: " + "; ".join(what for _, what in checks)) if not failed else "FAILS: " + "; ".join(failed)


def report(cpu: dict, runs: dict[str, dict], commit: str) -> str:
    """The tables for ``runs`` (label -> evaluate's result; the first is float32, the reference)."""
    n_open, n_facts = len(OPENERS), len(FACTS)
    labels = list(runs)
    f32 = runs[labels[0]]

    def row(name, cell):
        return f"| {name} | " + " | ".join(cell(runs[k], k == labels[0]) for k in labels) + " |"

    def rel(key, fmt="{:.3f}"):
        return lambda r, ref: fmt.format(r[key]) + ("" if ref else f" ({r[key] / f32[key] - 1:+.2%})")

    def speed(key):
        return lambda r, ref: f"{r[key]:.1f}" + ("" if ref else f" ({r[key] / f32[key]:.2f}x)")

    def median_shared(r, ref):
        shared = r.get("shared_tokens_with_fp32")
        return "64" if ref or not shared else str(sorted(shared)[len(shared) // 2])

    lines = [
        f"# bfloat16 vs float32 on the CPU ({datetime.date.today()})",
        "",
        f"CPU: {cpu['model']}, flags {' '.join(cpu['flags']) or '(none of the bf16/AMX ones)'}; commit {commit}; "
        + "; ".join(f"{k}: served as {r['dtype']}, linear kernel {r['cpu_linear']}" for k, r in runs.items()) + ".",
        "",
        "| measure | " + " | ".join(labels) + " |",
        "| --- |" + " --- |" * len(labels),
        row(f"facts answered right (of {n_facts})", lambda r, ref: str(sum(r["facts"]))),
        row(f"open answers identical to float32's (of {n_open}, 64 tokens)",
            lambda r, ref: str(n_open if ref else r["equal_to_fp32"])),
        row(f"tokens shared with float32's answer before they part (median of {n_open})", median_shared),
        row(f"perplexity of the fixed text ({f32['text_tokens']} tokens)", rel("perplexity_text")),
        row(f"perplexity of float32's own answers ({f32['answer_tokens']} tokens)", rel("perplexity_fp32_answers")),
        row("answers alone = in a batch of 8 (of 8)", lambda r, ref: str(r["batched_equal"])),
        row("second turn from the prefix cache = prefilled afresh (of 8)", lambda r, ref: str(r["cache_equal"])),
        row("decode tok/s, 1 stream", speed("tok_s_1")),
        row("decode tok/s, 8 streams", speed("tok_s_8")),
        "",
        f"Bound for serving it (`--cpu-linear bfloat16`): perplexity of the fixed text within "
        f"+{BOUND['perplexity']:.0%} of float32's, at most {BOUND['facts']} fact fewer, answers alone = batched "
        "and prefix cache = fresh 8 of 8.",
        "",
    ]
    for k in labels[1:]:
        lines.append(f"- {k}: {verdict(f32, runs[k])}")
    lines += ["", "Facts missed: " + "; ".join(
        f"{k} " + (", ".join(q for (q, _), ok in zip(FACTS, r["facts"]) if not ok) or "none")
        for k, r in runs.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--no-full-bf16", action="store_true", help="skip the whole model in bfloat16")
    ap.add_argument("--int8", action="store_true", help="also bfloat16 products of int8 weights (--cpu-linear int8)")
    args = ap.parse_args()
    commit = sh(["git", "rev-parse", "--short", "HEAD"])
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} {cpu['flags']}", flush=True)
    runs = {"float32": evaluate(args.model, "float32", args.new_tokens, None)}
    print("float32 done", flush=True)
    runs["bfloat16 linear layers"] = evaluate(args.model, "float32", args.new_tokens, runs["float32"], "bfloat16")
    print("bfloat16 linear layers done", flush=True)
    if args.int8:
        runs["int8 weights, keys and values"] = evaluate(args.model, "float32", args.new_tokens, runs["float32"], "bfloat16", "int8")
        print("int8 weights done", flush=True)
    if not args.no_full_bf16:
        runs["bfloat16 model"] = evaluate(args.model, "bfloat16", args.new_tokens, runs["float32"])
    text = report(cpu, runs, commit)
    print(text)
    stem = args.out / f"{datetime.date.today()}-dtype-quality"
    write_results(stem, {"cpu": cpu, "commit": commit, **runs}, text, indent=1)
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
