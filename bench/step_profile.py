"""Where a decode step's time goes, float32 against bfloat16 linear layers (``--cpu-linear bfloat16``).

    PYTHONPATH=service .venv/bin/python bench/step_profile.py [--rows 1,8,16] [--context 300] [--steps 20] [--modes M|M]

Runs the engine's own runner (packed, fused, as the engine serves) on ``rows`` sequences with
``context`` cached positions each, times decode steps, and sorts the time of the profiled steps by
operator (torch.profiler, CPU): the products (oneDNN), the attention (SDPA in float32; the
batch-invariant attention's matmul / exp / cumsum in bfloat16 mode), and the rest. Prints the CPU.
"""

from __future__ import annotations

import argparse
import os
import time
import types
from collections import defaultdict

import torch

from lib.host import cpu_description

BUCKETS = [  # (bucket, substrings of an operator name), the first that matches wins
    ("products (oneDNN linear)", ["_linear_pointwise"]),
    ("products (AMX kernel)", ["chatstream::linear"]),  # and linear_int8
    ("attention: SDPA", ["scaled_dot_product", "flash_attention"]),
    ("attention: compiled kernel", ["chatstream::attend"]),
    ("compiled row-wise steps (norms, rotary, activation)", ["chatstream::"]),
    ("attention: matmul/bmm", ["aten::bmm", "aten::baddbmm", "aten::matmul"]),
    ("attention: softmax parts", ["aten::exp", "aten::cumsum", "aten::amax", "aten::masked_fill", "aten::sum",
                                  "aten::div"]),
    ("casts and copies", ["aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::cat",
                          "aten::clone"]),
    ("KV cache writes", ["aten::index_put", "aten::index"]),
]


MODES = [("float32", "kernel", "float32 products, SDPA"),
         ("bfloat16", "kernels", "bfloat16 products, compiled attention and row-wise steps, bfloat16 keys (as served)"),
         ("bfloat16", "onednn products", "the same with oneDNN's products where AMX ones serve"),
         ("bfloat16", "int8 weights", "int8 weights on AMX's integer tiles, int8 keys and values (--cpu-linear int8)"),
         ("bfloat16", "int8 weights, bfloat16 keys", "int8 weights, bfloat16 keys and values"),
         ("bfloat16", "attention kernel", "bfloat16 products, compiled attention, row-wise steps from operators"),
         ("bfloat16", "operators", "bfloat16 products, invariant attention from operators, float32 keys")]


def bucket(name: str) -> str:
    for label, keys in BUCKETS:
        if any(k in name for k in keys):
            return label
    return "other (norms, rotary, adds, embedding)"


def runner_for(linear_dtype: str, rows: int, attention: str = "kernels"):
    from chatstream import load_model
    from chatstream.engine import cpu_linear, native
    from chatstream.engine.runner import ModelRunner
    model, _ = load_model("builtin:smollm2-135m-instruct", device="cpu")
    if attention == "onednn products":  # linear_kernel.cpp's AMX products turned off for this model
        os.environ["CHATSTREAM_AMX_LINEAR"] = "0"
        native.amx_linear.cache_clear()
    try:
        choice = cpu_linear.prepare_linears(model, "int8" if attention.startswith("int8") else "onednn", linear_dtype)
    finally:
        os.environ.pop("CHATSTREAM_AMX_LINEAR", None)
        native.amx_linear.cache_clear()
    runner = ModelRunner(model, rows)
    if choice.linear_dtype == "bfloat16":
        runner.serve_invariant(torch.int8 if attention == "int8 weights" else torch.bfloat16)
        if attention in ("attention kernel", "operators"):  # PyTorch's operators between the products
            runner._native().layers = lambda: None
        if attention == "operators":  # and attention.py's operators, which read float32 keys
            runner.cache.dtype = None
            runner._native().kernel = False
    return runner


def profile(linear_dtype: str, rows: int, context: int, steps: int,
            attention: str = "kernels") -> tuple[float, dict[str, float]]:
    from chatstream.engine.scheduler import Chunk
    runner = runner_for(linear_dtype, rows, attention)
    gen = torch.Generator().manual_seed(0)
    seqs = [types.SimpleNamespace(prompt_ids=torch.randint(100, 20000, (context,), generator=gen).tolist(), row=r,
                                  length=0, next_token=None) for r in range(rows)]
    with torch.inference_mode():
        runner.reserve(context + 2 * steps + 8)
        for s in seqs:
            runner.prefill([Chunk(s, 0, context)])
            s.length, s.next_token = context, 1
        for _ in range(3):  # warm
            runner.decode(seqs)
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.decode(seqs)
        per_step = (time.perf_counter() - t0) / steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                runner.decode(seqs)
    shares: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        shares[bucket(e.key)] += e.self_cpu_time_total
    total = sum(shares.values())
    return per_step, {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="", help="'|'-separated modes to run (the second names of MODES); all by default")
    args = ap.parse_args()
    modes = [m for m in MODES if not args.modes or m[1] in args.modes.split("|")]
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; {args.context} cached positions per row, {args.steps} decode steps")
    for rows in (int(r) for r in args.rows.split(",")):
        for linear_dtype, attention, label in modes:
            per_step, shares = profile(linear_dtype, rows, args.context, args.steps, attention)
            print(f"\n{rows} rows, {label}: {per_step * 1e3:.1f} ms a step "
                  f"({rows / per_step:.1f} tok/s)")
            for k, v in shares.items():
                print(f"  {v:6.1%}  {k}")


if __name__ == "__main__":
    main()
