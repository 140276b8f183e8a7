"""The linear layers of a decode step in float32 and in bfloat16, and whether each keeps a row's result
independent of its batch.

    .venv/bin/python bench/linear_dtype.py [--engine]

Why: bfloat16 halves the bytes a decode step reads and doubles the multiply rate where the CPU has
AVX-512 BF16 or AMX, so it is the largest lever left on the CPU (bench/results/2026-12-04-roofline.md).
The engine promises that a greedy answer depends only on its prompt, not on its batch neighbours or on
the prefix cache (docs/architecture.md), and that rests on every kernel giving a row the same bits
whatever the number of rows. This prints both sides of the trade for SmolLM2-135M's shapes with
oneDNN's prepacked kernel (what the engine serves with):

- one pass over all the linear layers of a step (30 layers of fused q/k/v, o, fused gate/up, down, and
  the lm_head; each its own weight, so they stream from memory as in a step), at 1 / 8 / 16 / 64 rows,
  float32 against bfloat16 (bfloat16 timed with the casts of the input and the output, as a
  "bfloat16 linear layers, float32 elsewhere" mode would run);
- for each weight shape in bfloat16, at how many batch sizes from 2 to 300 some row differs from the
  same row computed alone (0 is what the promise needs);
- float32 attention (SDPA) for one decoding row, alone and with masked positions after its own
  (what a longer batch neighbour does to the KV view): the difference, in float32 ulps;
- with ``--engine``, the engine itself with bfloat16 linear layers and float32 everywhere else (a probe,
  not a served mode: :class:`BF16Linear` below stands in for the packed float32 layers; down_proj's
  input is split into pieces no wider than 576, each row-invariant above): decode steps per second
  against float32 at 1 / 8 / 16 closed-loop clients, whether any linear call gave a row other bits
  than that row alone, and how many of 8 greedy answers are the same alone and in a batch of 8.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time

import torch
from lib.engine import alone, chat_ids, closed_loop, generate
from lib.host import ROOT, cpu_description

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # fused q/k/v, o, fused gate/up, down
LM_HEAD = (49152, 576)
MACS_PER_ROW = LAYERS * sum(o * i for o, i in SHAPES) + LM_HEAD[0] * LM_HEAD[1]


def linear(x: torch.Tensor, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "").float()


def pass_times(rows=(1, 8, 16, 64), rounds: int = 6) -> None:
    shapes = SHAPES * LAYERS + [LM_HEAD]
    print(f"one pass over a step's linear layers ({len(shapes)} weights, {MACS_PER_ROW / 1e6:.0f} M multiply-adds"
          " per row), best of", rounds)
    print("| rows | float32 (ms) | bfloat16 (ms) | bfloat16 speed-up | float32 GB/s | bfloat16 GB/s |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=gen) * 0.02 for o, i in shapes]
    packed = {dt: [torch.ops.mkldnn._reorder_linear_weight(w.to(dt), 32) for w in weights]
              for dt in (torch.float32, torch.bfloat16)}
    nbytes = {dt: sum(w.numel() * dt.itemsize for w in weights) for dt in packed}
    for n in rows:
        xs = {i: torch.randn(n, i, generator=gen) for i in {i for _, i in shapes}}
        best = {}
        for dt, ps in packed.items():
            t = float("inf")
            for round_ in range(rounds + 1):
                start = time.perf_counter()
                for w, p in zip(weights, ps):
                    linear(xs[w.shape[1]], p, dt)
                if round_:
                    t = min(t, time.perf_counter() - start)
            best[dt] = t
        f32, bf16 = best[torch.float32], best[torch.bfloat16]
        print(f"| {n} | {f32 * 1e3:.1f} | {bf16 * 1e3:.1f} | {f32 / bf16:.2f}x | "
              f"{nbytes[torch.float32] / f32 / 1e9:.1f} | {nbytes[torch.bfloat16] / bf16 / 1e9:.1f} |")


def row_invariance(max_rows: int = 300) -> None:
    print(f"\nbfloat16, oneDNN prepacked: batch sizes 2..{max_rows - 1} at which some row differs from that row alone")
    print("| weight (out x in) | batch sizes with a differing row | first ones |")
    print("|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for o, i in SHAPES + [LM_HEAD]:
        packed = torch.ops.mkldnn._reorder_linear_weight((torch.randn(o, i, generator=gen) * 0.02).bfloat16(), 32)
        x = torch.randn(max_rows, i, generator=gen)
        alone = torch.cat([linear(x[r:r + 1], packed, torch.bfloat16) for r in range(max_rows)])
        bad = [n for n in range(2, max_rows) if not torch.equal(linear(x[:n], packed, torch.bfloat16), alone[:n])]
        print(f"| {o} x {i} | {len(bad)} of {max_rows - 2} | {bad[:6]} |")


SPLIT = 576  # the widest input at which every shape above kept rows invariant


class BF16Linear(torch.nn.Module):
    """A linear layer computed in bfloat16 (oneDNN prepacked, input split into pieces of at most SPLIT
    columns, pieces summed in float32); output in float32. Counts calls whose rows differ from alone."""

    calls = differing = 0

    def __init__(self, linear: torch.nn.Linear, _packed=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().bfloat16()
        n = -(-w.shape[1] // SPLIT)
        size = -(-w.shape[1] // n)
        self.parts = [(s, s + size, torch.ops.mkldnn._reorder_linear_weight(w[:, s:s + size].contiguous(), 32))
                      for s in range(0, w.shape[1], size)]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        xb, y = x.bfloat16(), None
        for s, e, p in self.parts:
            part = torch.ops.mkldnn._linear_pointwise(xb[..., s:e].contiguous(), p, None, "none", [], "").float()
            y = part if y is None else y + part
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._run(x)
        if CHECK_ROWS:
            flat, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            if flat.shape[0] > 1:
                BF16Linear.calls += 1
                rows = range(0, flat.shape[0], max(1, flat.shape[0] // 4))
                BF16Linear.differing += any(not torch.equal(self._run(flat[r:r + 1]), out[r:r + 1]) for r in rows)
        return y


CHECK_ROWS = False
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "How do airplanes fly?",
             "Give me a recipe for pancakes.", "What is 12 times 12?"]


def _engine(dtype: str):
    sys.path.insert(0, str(ROOT / "service"))
    from chatstream import load_model
    from chatstream.engine import Engine, cpu_linear
    if dtype == "bfloat16":
        cpu_linear.PackedLinear = BF16Linear
        cpu_linear._agrees = lambda linear, packed: True  # bfloat16 differs from float32 by design
    model, tok = load_model("builtin:smollm2-135m-instruct")
    engine = Engine(model, tok, max_batch=32, max_context=2048, cpu_linear="onednn")
    engine.start()
    return engine, tok


def engine_probe(dtype: str) -> None:
    """One process per dtype (the patch is process-wide): steps/s under load, then the answer check."""
    global CHECK_ROWS
    engine, tok = _engine(dtype)
    rates = [closed_loop(engine, clients, 15, warmup=5)[1] for clients in (1, 8, 16)]
    CHECK_ROWS = dtype == "bfloat16"
    prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    answers = alone(engine, prompts, 48)
    together = generate(engine, prompts, 48)
    same = sum(a == b for a, b in zip(answers, together))
    print(f"{dtype}: steps/s at 1/8/16 clients {' / '.join(f'{r:.1f}' for r in rates)}; "
          f"answers the same alone and in a batch of 8: {same} of {len(prompts)}"
          + (f"; linear calls of several rows: {BF16Linear.calls}, with a row differing from it alone: "
             f"{BF16Linear.differing}" if CHECK_ROWS else ""), flush=True)
    print("ANSWERS", repr(answers), flush=True)
    os._exit(0)


def attention_invariance() -> None:
    """float32 SDPA, as the engine calls it for a decoding row: one query against L cached positions,
    alone and with masked columns after them (the batch's longer rows widen the KV view)."""
    gen = torch.Generator().manual_seed(2)
    print("\nfloat32 SDPA, one query row: the same L positions alone and with E masked positions after them")
    print("| L | E | max abs difference |")
    print("|---|---|---|")
    for length in (37, 100, 300):
        q, k, v = (torch.randn(1, 9, n, 64, generator=gen) for n in (1, length, length))
        alone = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(1, 1, 1, length, dtype=torch.bool))
        for extra in (1, 30, 200):
            pad = [torch.randn(1, 9, extra, 64, generator=gen) for _ in range(2)]
            mask = torch.zeros(1, 1, 1, length + extra, dtype=torch.bool)
            mask[..., :length] = True
            out = torch.nn.functional.scaled_dot_product_attention(
                q, torch.cat([k, pad[0]], 2), torch.cat([v, pad[1]], 2), attn_mask=mask)
            print(f"| {length} | {extra} | {(out - alone).abs().max().item():.2e} |")


def main() -> None:
    torch.set_num_threads(2)
    if len(sys.argv) > 2 and sys.argv[1] == "--engine-child":
        return engine_probe(sys.argv[2])
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}\n")
    with torch.inference_mode():
        pass_times()
        row_invariance()
        attention_invariance()
    if "--engine" in sys.argv[1:]:
        print("\nthe engine, bfloat16 linear layers and float32 elsewhere (a probe), against float32:")
        answers = {}
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, __file__, "--engine-child", dtype], capture_output=True, text=True)
            lines = out.stdout.splitlines()
            print("\n".join(ln for ln in lines if not ln.startswith("ANSWERS")) or out.stderr[-2000:])
            answers[dtype] = next((ast.literal_eval(ln[8:]) for ln in lines if ln.startswith("ANSWERS")), [])
        same = sum(a == b for a, b in zip(answers["float32"], answers["bfloat16"]))
        print(f"bfloat16-linear answers equal to float32's (each alone): {same} of {len(QUESTIONS)}")


if __name__ == "__main__":
    main()
