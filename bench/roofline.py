"""How fast any server could run SmolLM2-135M in float32 on this machine: the roofline.

A decode step must read every weight once (and each row's cached keys and values)
and do two flops per weight per row. This script measures the two limits of the
machine it runs on, with the same torch the servers use:

* memory: the read bandwidth of a plain pass over 1 GiB (``tensor.sum()`` on all
  threads, best of several), which is what a memory-bound step can approach;
* compute: float32 matrix-multiply throughput on the model's own shapes at a busy
  batch (oneDNN's packed kernel, as the engine serves, and PyTorch's), best of
  several.

From them and the model's shape it prints, per concurrency, the shortest step the
machine allows, ``max(bytes / bandwidth, flops / throughput)``, and so the most
output tokens/s any server can reach there (every client decoding: one token per
row per step; prefill and Python excluded, so the true ceiling is lower). With
``--results`` (a bench/run.py or multiturn.py JSON) it sets each server's measured
tok/s against that ceiling, and the issue's goals (2x / 1.5x vLLM's best) too:
a goal that needs more of the roofline than any server reaches here is a goal
about kernels, not about scheduling.

    .venv/bin/python bench/roofline.py
    .venv/bin/python bench/roofline.py --results bench/results/2026-12-04-2cpu-amd-epyc.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lib.host import cpuinfo

# SmolLM2-135M-Instruct (config.json of the builtin model)
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 576, 30, 9, 3, 64, 1536, 49152
LAYER_WEIGHTS = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * FFN
STEP_WEIGHTS = LAYERS * LAYER_WEIGHTS + VOCAB * HIDDEN  # the tied embedding is read again as lm_head
KV_BYTES_PER_POSITION = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4


def bandwidth(gib: float = 1.0, rounds: int = 8) -> float:
    """Bytes/s of the fastest plain read of ``gib`` GiB (far above any last-level cache)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def throughput(rows: int = 256, rounds: int = 5) -> dict[str, float]:
    """Flops/s of float32 matmuls over one layer's shapes at ``rows`` rows, per kernel."""
    shapes = [(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), (HEADS * HEAD_DIM, HIDDEN), (HIDDEN, 2 * FFN), (FFN, HIDDEN)]
    weights = [torch.randn(out, inp) for inp, out in shapes]
    xs = [torch.randn(rows, inp) for inp, _ in shapes]
    flops = sum(2 * rows * w.numel() for w in weights)
    result = {}
    with torch.inference_mode():
        kernels = {"torch": lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, weights)]}
        if torch.backends.mkldnn.is_available():
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
            kernels["onednn"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                         for x, p in zip(xs, packed)]
        for name, run in kernels.items():
            run()
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(10):
                    run()
                best = min(best, (time.perf_counter() - start) / 10)
            result[name] = flops / best
    return result


def ceiling(rows: int, context: int, bytes_per_s: float, flops_per_s: float) -> dict[str, float]:
    """The shortest decode step for ``rows`` rows of ``context`` cached positions, and its tok/s."""
    weight_s = STEP_WEIGHTS * 4 / bytes_per_s
    kv_s = rows * context * KV_BYTES_PER_POSITION / bytes_per_s
    compute_s = 2 * STEP_WEIGHTS * rows / flops_per_s
    step = max(weight_s + kv_s, compute_s)
    return {"step_ms": step * 1e3, "bound": "memory" if weight_s + kv_s >= compute_s else "compute",
            "tok_s": rows / step}


def measured(path: Path) -> dict[str, dict[int, float]]:
    """tok/s per server and level from a bench/run.py JSON (single-turn)."""
    data = json.loads(path.read_text())
    out: dict[str, dict[int, float]] = {}
    for key, server in (data.get("results") or {}).items():
        for level, row in ((server or {}).get("levels") or {}).items():
            if isinstance(row, dict) and row.get("tok_s"):
                out.setdefault(key, {})[int(level)] = row["tok_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,8,16,32")
    ap.add_argument("--context", type=int, default=150, help="cached positions per row (single-turn: ~90 + 64)")
    ap.add_argument("--results", type=Path, help="a bench/run.py results JSON to set against the ceiling")
    args = ap.parse_args()

    cpu = cpuinfo()[0]
    bw = bandwidth()
    flops = throughput()
    best = max(flops.values())
    print(f"CPU: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"read bandwidth (1 GiB, best of 8): {bw / 1e9:.1f} GB/s")
    print("float32 matmul, one layer's shapes at 256 rows: "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in flops.items()))
    print(f"a decode step reads {STEP_WEIGHTS * 4 / 2**20:.0f} MiB of weights "
          f"({STEP_WEIGHTS / 1e6:.0f} M multiply-adds per row) and {KV_BYTES_PER_POSITION / 1024:.0f} KiB "
          f"per cached position\n")
    runs = measured(args.results) if args.results else {}
    header = "| clients | shortest step (ms) | bound | ceiling tok/s |" + "".join(f" {k} (of ceiling) |" for k in runs)
    print(header)
    print("|" + "---|" * (4 + len(runs)))
    for level in (int(x) for x in args.levels.split(",")):
        c = ceiling(level, args.context, bw, best)
        cells = "".join(f" {runs[k][level]:.1f} ({runs[k][level] / c['tok_s']:.0%}) |" if level in runs[k] else " |"
                        for k in runs)
        print(f"| {level} | {c['step_ms']:.1f} | {c['bound']} | {c['tok_s']:.0f} |{cells}")
        vllm = max((runs[k].get(level, 0) for k in runs if k.startswith("vllm")), default=0)
        if vllm:
            goal = (1.3 if level == 1 else 1.5) * vllm
            print(f"|   | goal {goal:.0f} tok/s needs {goal / c['tok_s']:.0%} of the ceiling "
                  f"(2x vLLM: {2 * vllm / c['tok_s']:.0%}) | | |" + " |" * len(runs))


if __name__ == "__main__":
    main()
