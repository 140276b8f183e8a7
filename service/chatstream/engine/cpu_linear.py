"""oneDNN prepacked weights for every linear layer of a model served on the CPU.

Why: on the CPU almost all of a step is matrix multiplication (about 75-87% on
SmolLM2-135M), and PyTorch's default CPU ``linear`` calls the BLAS with the
weight in its stored layout on every step. oneDNN can reorder a weight once
into the blocked layout its kernels read fastest and then reuse it; this is
what Intel's extension and inductor's "freezing" do. On the 2-core AMD EPYC of
bench/results it makes a whole decode step 2.1-2.4x faster in float32 (batch 1
to 32) and a 512-token prefill 2x faster. The arithmetic stays in the model's
dtype (float32 stays IEEE float32; only the summation order changes, ~1e-6
relative), and a row's result does not depend on the other rows of the batch.

The weight is replaced, not copied, except where it is shared with another
module: tied input embeddings keep their weight for the lookup, so a model with
tied embeddings holds that matrix twice (113 MB for SmolLM2-135M in float32). Every layer
is checked once against ``torch.nn.functional.linear``; if oneDNN is missing,
the dtype is not one it packs, or a result disagrees, the model is left as it
was.

Which kernel serves is decided here too (:func:`prepare_linears`, called by the
engine on its own thread before it serves): measured on this CPU (``auto``),
or as asked (``onednn``, ``torch``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from . import bf16_linear, native
from .fused_linear import fuse_projections

log = logging.getLogger("chatstream.engine")

PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` for inference with its weight held in oneDNN's blocked layout."""

    def __init__(self, linear: torch.nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = packed
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn=packed"


REQUESTS = ("auto", "onednn", "torch", "bfloat16", "int8")
# The model attribute where ``auto`` notes its choice, so that a second engine over the model keeps it
# without measuring again (a packed model shows its choice; one left to PyTorch's kernel would not).
CHOSEN = "chatstream_linear_kernel"


def check_request(request: str) -> None:
    if request not in REQUESTS:
        raise ValueError(f"cpu_linear must be 'auto', 'onednn', 'torch', 'bfloat16' or 'int8', not {request!r}")


@dataclass(frozen=True)
class KernelChoice:
    """The kernel that serves a model's linear layers on the CPU, and what was done to the model for it."""
    kernel: str                                         # "onednn" (layers prepacked) or "torch"
    timings: dict[int, dict[str, float]] | None = None  # what :func:`measure` found (``auto`` only)
    packed: int = 0                                     # layers now holding prepacked weights
    fused: int = 0                                      # groups of sibling projections fused (fused_linear.py)
    linear_dtype: str = "float32"                       # what the products run in: float32 or bfloat16
    int8_weights: bool = False                          # bfloat16 products from int8 weights (BF16Linear)


def prepare_linears(model: torch.nn.Module, request: str = "auto", linear_dtype: str = "float32") -> KernelChoice:
    """Choose the linear kernel for ``model`` and prepare the model for it, in place.

    ``auto`` times PyTorch's kernel against oneDNN's prepacked one on the model's own layers
    (:func:`measure`, about a second) and takes oneDNN only when it wins (:func:`choose`): which one
    wins depends on the CPU, its memory and its BLAS. ``onednn`` packs without measuring, ``torch``
    leaves the model as it is. A model that cannot be packed (:func:`why_not_packable`) is served by
    PyTorch's kernel whatever was asked. Call it on the thread that will run the model (Engine._prepare_model
    says why).

    ``linear_dtype`` "bfloat16" (asked for, or chosen by ``"auto"`` where :func:`bf16_linear.check`
    passes) serves a float32 model's products in bfloat16 with oneDNN whatever ``request`` says.
    ``request`` "int8" is "bfloat16" with the weights in int8 where the CPU has AMX (native.amx_linear;
    bfloat16 weights elsewhere, logged).
    """
    check_request(request)
    bf16_linear.check_request(linear_dtype)
    int8 = request == "int8"
    if int8 and not native.amx_linear():
        log.warning("int8 weights need AMX products (linear_kernel.cpp), which this machine lacks: bfloat16 "
                    "weights instead")
        int8 = False
    if request in ("bfloat16", "int8"):  # --cpu-linear bfloat16 / int8: where the check passes, else auto
        request, linear_dtype = "auto", ("auto" if linear_dtype == "float32" else linear_dtype)
    if linear_dtype != "float32":
        reason = why_not_packable(model)
        param = next(model.parameters(), None)
        if reason is None and param.dtype != torch.float32:
            reason = f"the model is {param.dtype}, not float32"
        layouts = {}
        if reason is None and linear_dtype == "auto":
            reason, layouts = bf16_linear.check(model)
        elif reason is None:  # asked for: served even where the check fails, then in the most pieces
            layouts = bf16_linear.product_layouts(model)[1]
        if reason:
            log.warning("linear layers serve in float32, not bfloat16 (linear_dtype=%s): %s", linear_dtype, reason)
        else:
            fused = fuse_projections(model)
            packed = pack_linears(model, dtype=torch.bfloat16, layouts=layouts, int8=int8)
            if packed:
                log.info("linear layers serve in bfloat16 (%s); attention is the batch-invariant one",
                         "AMX, int8 weights" if int8 else "AMX" if native.amx_linear() else "oneDNN; pieces by shape: "
                         + (", ".join(f"{o}x{i} {layout}" for (o, i), layout in layouts.items()) or "the most"))
                return KernelChoice("onednn", None, packed, fused, "bfloat16", int8)
            log.warning("linear layers serve in float32: packing them in bfloat16 failed")
    choice, timings = request, None
    if choice == "auto":
        choice = "torch"
        if packed_count(model):  # a second engine over a model the first one packed
            choice = "onednn"
        elif getattr(model, CHOSEN, None):  # ... or left as it was, having measured PyTorch's kernel faster
            choice = getattr(model, CHOSEN)
        elif why_not_packable(model) is None:
            timings = measure(model)
            choice = choose(timings)
            setattr(model, CHOSEN, choice)
            log.info("linear kernels measured on this CPU: oneDNN %.2fx PyTorch's (%s); serving with %s",
                     speedup(timings), ", ".join(f"{n} rows {t['torch'] * 1e3:.1f} vs {t['onednn'] * 1e3:.1f} ms"
                                                 for n, t in timings.items()), choice)
    fused = 0
    if choice == "onednn" and why_not_packable(model) is None:
        # q/k/v and gate/up as one product each: 5-7% off a decode step here (fused_linear.py).
        fused = fuse_projections(model)
    packed = pack_linears(model) if choice == "onednn" else 0
    if packed:
        log.info("the engine owns the model: its linear layers now hold oneDNN prepacked weights")
    return KernelChoice("onednn" if packed else "torch", timings, packed, fused)


def why_not_packable(model: torch.nn.Module) -> str | None:
    """Why the model's linear layers cannot be packed; None when they can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return "the model is not on the CPU"
    if param.dtype not in PACKABLE:
        return f"oneDNN packing is used for float32 and bfloat16, not {param.dtype}"
    return None


# Row counts a served model's linear layers see: one decoding stream, a busy decode batch, a prefill chunk.
MEASURED_ROWS = (1, 16, 128)
KERNELS = ("torch", "onednn")
# Weights a measurement streams through: several times any CPU's last-level cache, so that the layers
# come from memory as they do in a step (a decode step at one row is a memory-bound pass over every weight).
MEASURED_BYTES = 256 * 2**20


# A timed pass counts only if the measuring thread was on a CPU for this share of it. On a shared node
# (pods starting together, each measuring) passes are preempted at random: measured there by wall time,
# a pod chose PyTorch's kernel (0.43x) where oneDNN is 2.2x faster at one row on one thread.
ON_CPU = 0.8


def measure(model: torch.nn.Module, rows: tuple[int, ...] = MEASURED_ROWS, rounds: int = 3,
            batch_hint: int = 32, budget_bytes: int = MEASURED_BYTES,
            max_rounds: int = 12) -> dict[int, dict[str, float]]:
    """Seconds one pass through the linear layers of ``model`` takes with each kernel, per row count.

    The pass runs the model's own layers in model order, each with its own weight, as a step does:
    timing one layer again and again would keep its weight in the cache and hide the memory traffic
    that decides a decode step (on the 2-core AMD EPYC here, a hot-cache pass made oneDNN look
    2x faster than PyTorch at one row where a whole step was 1.4x). The first layers up to
    ``budget_bytes`` of weights are timed and the result is scaled to all of them. The two kernels
    alternate and the fastest of ``rounds`` undisturbed rounds is kept (after one warm-up round): a pass
    in which this thread was off the CPU for more than a fifth of the time (``ON_CPU``: thread time
    against wall time) is timed again, up to ``max_rounds``; if a kernel still has no undisturbed pass,
    both kernels are compared by the measuring thread's CPU time instead. About a second for SmolLM2-135M on 2 cores; the prepacked copies of the
    timed weights exist only while it runs.
    """
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    timed, timed_bytes = [], 0
    for m in linears:
        timed.append(m)
        timed_bytes += m.weight.numel() * m.weight.element_size()
        if timed_bytes >= budget_bytes:
            break
    if not timed:
        return {}
    scale = sum(m.weight.numel() * m.weight.element_size() for m in linears) / timed_bytes
    totals = {n: dict.fromkeys(KERNELS, 0.0) for n in rows}
    with torch.inference_mode():
        weights = [(m.weight.detach(), m.bias) for m in timed]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) for w, _ in weights]
        passes = {
            "torch": lambda xs: [torch.nn.functional.linear(xs[w.shape[1]], w, b) for w, b in weights],
            "onednn": lambda xs: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, b, "none", [], "")
                                  for (w, b), p in zip(weights, packed)],
        }
        for n in rows:
            xs = {w.shape[1]: torch.randn(n, w.shape[1]).to(w.dtype) for w, _ in weights}
            clean = {name: [] for name in KERNELS}
            on_cpu = dict.fromkeys(KERNELS, float("inf"))
            for round_ in range(max_rounds + 1):
                for name, run in passes.items():
                    start, cpu = time.perf_counter(), time.thread_time()
                    run(xs)
                    wall, ran = time.perf_counter() - start, time.thread_time() - cpu
                    if round_:
                        on_cpu[name] = min(on_cpu[name], ran)
                        if ran >= ON_CPU * wall:
                            clean[name].append(wall)
                if round_ >= rounds and all(len(v) >= rounds for v in clean.values()):
                    break
            # Never an undisturbed pass (a node busier than its cores): the time the measuring thread
            # spent on a CPU, which preemption does not inflate.
            fallback = not all(clean.values())
            for name in KERNELS:
                totals[n][name] = (on_cpu[name] if fallback else min(clean[name])) * scale
    return totals


def speedup(timings: dict[int, dict[str, float]]) -> float:
    """How much faster oneDNN is than PyTorch's kernel: the geometric mean over the row counts."""
    ratios = [t["torch"] / t["onednn"] for t in timings.values()]
    if not ratios:
        return 1.0
    product = 1.0
    for r in ratios:
        product *= r
    return product ** (1 / len(ratios))


def choose(timings: dict[int, dict[str, float]], margin: float = 0.05) -> str:
    """The kernel to serve with: oneDNN only when it is faster by more than ``margin`` overall.

    Each row count weighs the same (one stream, a decode batch, a prefill), so neither regime hides
    a loss in the other. Without a clear win the model is left as it is, with its own layers.
    """
    return "onednn" if speedup(timings) > 1 + margin else "torch"


def packed_count(model: torch.nn.Module) -> int:
    """How many of the model's layers already hold oneDNN prepacked weights."""
    return sum(isinstance(m, (PackedLinear, bf16_linear.BF16Linear)) for m in model.modules())


def pack_linears(model: torch.nn.Module, batch_hint: int = 32, dtype: torch.dtype | None = None,
                 layouts: dict[tuple[int, int], bf16_linear.Layout] | None = None, int8: bool = False) -> int:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`PackedLinear` (a :class:`bf16_linear.BF16Linear`
    with ``dtype=torch.bfloat16``, cut as ``layouts`` says for its shape, else in the most pieces; its
    weights in int8 where ``int8``); return how many the model now has.

    Packing a model twice (two engines over one model) is harmless: the second call finds nothing to swap.
    """
    reason = why_not_packable(model)
    if reason:
        log.info("linear layers left as they are: %s", reason)
        return 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    swaps = []
    with torch.inference_mode():
        for parent, name, linear in targets:
            try:
                if dtype == torch.bfloat16:
                    layout = (layouts or {}).get((linear.out_features, linear.in_features), bf16_linear.LAYOUTS[-1])
                    replacement = bf16_linear.BF16Linear(linear, batch_hint, layout, int8=int8)
                else:
                    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
                    replacement = PackedLinear(linear, packed)
                if not _agrees(linear, replacement):
                    log.warning("oneDNN disagrees with torch on %s; linear layers left as they are", name)
                    return 0
            except RuntimeError as exc:
                log.warning("oneDNN packing failed (%s); linear layers left as they are", exc)
                return 0
            swaps.append((parent, name, replacement))
    for parent, name, replacement in swaps:
        setattr(parent, name, replacement)
    if swaps:
        _release_checkpoint_mapping(model)
    count = packed_count(model)
    log.info("%d linear layers use oneDNN prepacked weights", count)
    return count


def _release_checkpoint_mapping(model: torch.nn.Module) -> None:
    """Give the tensors still in use memory of their own.

    transformers loads safetensors weights as views of the memory-mapped file. Packing reads every
    weight, which pages the whole file in; the pages stay mapped (and counted in the resident size)
    as long as any tensor (the embeddings, the norms) still views the mapping. Copying what is left
    drops the last views, so the mapping is released.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()


def _agrees(linear: torch.nn.Linear, packed: PackedLinear) -> bool:
    weight = linear.weight
    if getattr(packed, "scales", None) is not None:  # int8 weights: checked against what they hold
        q, scales = native.quantize_int8(weight)
        weight = q.float() * scales[:, None]
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    want = torch.nn.functional.linear(x, weight, linear.bias).float()
    got = packed(x).float()
    tolerance = 1e-4 if weight.dtype == torch.float32 and not isinstance(packed, bf16_linear.BF16Linear) else 2e-2
    return bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance * (1 + want.abs().max().item())))
