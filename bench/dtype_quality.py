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
4. invariance: in each dtype, the answers alone, in a batch of 8, and as a conversation's
   second turn read from the prefix cache against the same turn prefilled afresh. The
   project promises that batching and the cache never change a greedy answer;
5. speed: decode tokens/s of one stream and of 8 streams, per dtype, with the ratio.

It prints the tables, the CPU and its bfloat16 flags, and writes
bench/results/<date>-dtype-quality.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from multiturn_client import FOLLOW_UPS, OPENERS  # noqa: E402

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


def cpu_description() -> dict:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"]
    return {"model": model, "flags": [f for f in wanted if f in flags]}


class Collector:
    def __init__(self):
        self.ids, self.text, self.end, self.done = [], "", None, threading.Event()

    def __call__(self, event):
        from chatstream.engine import Delta
        if isinstance(event, Delta):
            self.text += event.text
        else:
            self.end = event
            self.done.set()


def chat_ids(tok, messages) -> list[int]:
    from chatstream.render import encode_chat
    return encode_chat(tok, messages, add_generation_prompt=True)


def generate(engine, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers; all prompts submitted at once (they batch when the engine has rows)."""
    from chatstream.engine import SamplingParams
    outs = []
    for ids in prompts:
        c = Collector()
        engine.submit(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0), c)
        outs.append(c)
    for c in outs:
        assert c.done.wait(600), "the engine did not answer"
        assert c.end is not None and type(c.end).__name__ == "Finished", c.end
    return [c.text for c in outs]


def alone(engine, prompts, max_new_tokens):
    return [generate(engine, [p], max_new_tokens)[0] for p in prompts]


def nll(model, ids: list[int], window: int = 1024) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` and the token count, in windows of ``window``."""
    import torch
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            logits = model(input_ids=torch.tensor([chunk[:-1]])).logits.float()[0]
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(chunk[1:])
            total -= logp.gather(1, target[:, None]).sum().item()
            count += len(chunk) - 1
    return total, count


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
    from chatstream.engine import SamplingParams
    outs = []
    for ids in prompts:
        c = Collector()
        engine.submit(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0), c)
        outs.append(c)
    for c in outs:
        c.done.wait(600)
    seconds = time.perf_counter() - t0
    return sum(c.end.completion_tokens for c in outs) / seconds


def evaluate(source: str, dtype: str, new_tokens: int, reference: dict | None) -> dict:
    import torch

    from chatstream import load_model
    from chatstream.engine import Engine

    model, tok = load_model(source, device="cpu", dtype=dtype)
    text_ids = tok(Path(HERE / "data" / "quality_text.txt").read_text())["input_ids"]
    text_nll, text_n = nll(model, text_ids)
    engine = Engine(model, tok, max_batch=8, max_context=2048, cpu_linear="auto", prefix_cache_tokens=0)
    engine.start()
    out: dict = {"dtype": dtype, "cpu_linear": engine.cpu_linear}
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
        cached_engine = Engine(model, tok, max_batch=8, max_context=2048, cpu_linear="auto",
                               prefix_cache_tokens=16384)
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
        own = [nll(model, p + a) for p, a in zip(open_prompts, answer_ids)]
        # Only the answer tokens count: subtract the prompt's own NLL.
        prompt_part = [nll(model, p) for p in open_prompts]
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


def report(cpu: dict, f32: dict, bf16: dict, commit: str) -> str:
    n_open, n_facts = len(OPENERS), len(FACTS)
    shared = bf16["shared_tokens_with_fp32"]
    lines = [
        f"# bfloat16 vs float32 on the CPU ({datetime.date.today()})",
        "",
        f"CPU: {cpu['model']}, flags {' '.join(cpu['flags']) or '(none of the bf16/AMX ones)'}; "
        f"commit {commit}; linear kernel chosen: float32 {f32['cpu_linear']}, bfloat16 {bf16['cpu_linear']}.",
        "",
        "| measure | float32 | bfloat16 |",
        "| --- | --- | --- |",
        f"| facts answered right (of {n_facts}) | {sum(f32['facts'])} | {sum(bf16['facts'])} |",
        f"| open answers identical to float32's (of {n_open}, 64 tokens) | {n_open} | {bf16['equal_to_fp32']} |",
        f"| tokens shared with float32's answer before they part (median of {n_open}) | 64 | "
        f"{sorted(shared)[len(shared) // 2]} |",
        f"| perplexity of the fixed text ({f32['text_tokens']} tokens) | {f32['perplexity_text']:.3f} | "
        f"{bf16['perplexity_text']:.3f} ({bf16['perplexity_text'] / f32['perplexity_text'] - 1:+.2%}) |",
        f"| perplexity of float32's own answers ({f32['answer_tokens']} tokens) | "
        f"{f32['perplexity_fp32_answers']:.3f} | {bf16['perplexity_fp32_answers']:.3f} "
        f"({bf16['perplexity_fp32_answers'] / f32['perplexity_fp32_answers'] - 1:+.2%}) |",
        f"| answers alone = in a batch of 8 (of 8) | {f32['batched_equal']} | {bf16['batched_equal']} |",
        f"| second turn from the prefix cache = prefilled afresh (of 8) | {f32['cache_equal']} | "
        f"{bf16['cache_equal']} |",
        f"| decode tok/s, 1 stream | {f32['tok_s_1']:.1f} | {bf16['tok_s_1']:.1f} "
        f"({bf16['tok_s_1'] / f32['tok_s_1']:.2f}x) |",
        f"| decode tok/s, 8 streams | {f32['tok_s_8']:.1f} | {bf16['tok_s_8']:.1f} "
        f"({bf16['tok_s_8'] / f32['tok_s_8']:.2f}x) |",
        "",
        "Facts missed: float32 " + (", ".join(q for (q, _), ok in zip(FACTS, f32["facts"]) if not ok) or "none")
        + "; bfloat16 " + (", ".join(q for (q, _), ok in zip(FACTS, bf16["facts"]) if not ok) or "none") + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} {cpu['flags']}", flush=True)
    f32 = evaluate(args.model, "float32", args.new_tokens, None)
    print("float32 done", flush=True)
    bf16 = evaluate(args.model, "bfloat16", args.new_tokens, f32)
    text = report(cpu, f32, bf16, commit)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{datetime.date.today()}-dtype-quality"
    stem.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "commit": commit, "float32": f32,
                                                     "bfloat16": bf16}, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
