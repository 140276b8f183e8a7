"""bfloat16 linear layers with float32 everywhere else, and the check that decides whether they serve.

Why: a decode step on the CPU is a pass over every weight, and bfloat16 halves the bytes; on CPUs
with AVX-512 BF16 or AMX oneDNN also multiplies twice as fast. On the 2-core AMD EPYC of
bench/results a pass over SmolLM2-135M's linear layers is 1.4-1.8x faster and a one-client step
1.35-1.53x (2026-12-04-bf16-linear.md). vLLM's CPU build serves bfloat16 by default for the same
reason. Only the products run in bfloat16: the residual stream, norms, rotary embedding, attention
and the logits stay float32, so the model's quality is within a hair of float32's
(bench/dtype_quality.py measures it).

The engine promises that a greedy answer does not depend on the batch or on the prefix cache. That
needs every product to give a row the same bits whatever the number of rows, and oneDNN's bfloat16
kernels do not, in ways that depend on the CPU: on the AMD EPYC of bench/results a 1536-wide input
(down_proj) is reduced differently from 13 rows on, so there the input is cut into pieces no wider
than :data:`SPLIT`, multiplied one by one and summed in float32, in order; on the Intel Xeon with AMX
another kernel takes over from 33 rows and gives some rows (5 of 37 for the fused q/k/v) other bits,
so there the rows go in pieces of at most :data:`MAX_ROWS` (a 512-token prefill's products take 2.2x
as long). :func:`product_layouts` tries the cuts (:data:`LAYOUTS`) on each of the model's shapes and
keeps the first with which every row is the same alone and among others. Where the CPU has AMX,
linear_kernel.cpp's products serve instead (native.amx_linear): a row's bits there do not depend on
the other rows by construction, so nothing is cut; they also read the weights at the machine's
bandwidth where oneDNN's reach about half of it within a step (a step at 8 rows x 400 positions 28 ms
against 39 on the Intel Xeon of bench/results), and multiply a prefill 2x faster. Attention must be
batch-invariant too (native.py, attention.py): the engine's own Llama pass uses it whenever
these layers serve.

:func:`check` is what ``linear_dtype="auto"`` runs at start (about a second): the CPU must multiply
bfloat16 natively, every shape needs a layout that passes, and the invariant attention must give a
row the same bits alone as among other rows. Where anything fails the engine serves float32 and logs
why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import attention, native
from .fused_linear import fused_shapes

log = logging.getLogger("chatstream.engine")

SPLIT = 576  # widest input piece oneDNN's bfloat16 kernel reduces the same way at every row count
MAX_ROWS = 32  # the most rows oneDNN multiplies with its small-batch kernel (AMX takes another from 33)
DTYPES = ("float32", "bfloat16", "auto")


def check_request(linear_dtype: str) -> None:
    if linear_dtype not in DTYPES:
        raise ValueError(f"linear_dtype must be 'float32', 'bfloat16' or 'auto', not {linear_dtype!r}")


@dataclass(frozen=True)
class Layout:
    """How a layer's product is cut so that a row gets the same bits at any row count: input columns in
    pieces of at most ``split`` (None: whole), rows in pieces of at most ``max_rows`` (None: whole)."""
    max_rows: int | None = None
    split: int | None = SPLIT


# What :func:`product_layouts` tries for each shape, fastest first: the fewest pieces that pass.
LAYOUTS = (Layout(None, None), Layout(None, SPLIT), Layout(MAX_ROWS, None), Layout(MAX_ROWS, SPLIT))


class BF16Linear(torch.nn.Module):
    """``nn.Linear`` computed in bfloat16, float32 in and out: by linear_kernel.cpp where the CPU has AMX
    (whole: a row's bits never depend on the other rows there), else by oneDNN (weight prepacked), cut
    as ``layout`` says. ``int8``: the weights in int8 instead (AMX only; native.pack_linear_int8)."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int = 32, layout: Layout = Layout(),
                 int8: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = layout.max_rows
        self.parts, self.packed, self.scales = [], None, None
        if int8:
            if not native.amx_linear():
                raise RuntimeError("int8 weights need linear_kernel.cpp's AMX products, which this machine lacks")
            self.packed, self.scales = native.pack_linear_int8(linear.weight)
            self.max_rows = None
        elif native.amx_linear():
            self.packed, self.max_rows = native.pack_linear(linear.weight.detach().to(torch.bfloat16)), None
        else:
            weight = linear.weight.detach().to(torch.bfloat16)
            pieces = -(-self.in_features // (layout.split or self.in_features))
            size = -(-self.in_features // pieces)
            self.parts = [(start, min(start + size, self.in_features),
                           torch.ops.mkldnn._reorder_linear_weight(weight[:, start:start + size].contiguous(),
                                                                   batch_hint))
                          for start in range(0, self.in_features, size)]
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            out = self._amx(xb, bf16_out=False)
        else:
            out = self.product(xb).float()
        return out if self.bias is None else out + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The product of bfloat16 ``x`` without the bias: bfloat16 when it is one piece of columns, else
        the float32 sum of the pieces (what :meth:`forward` widens to float32)."""
        if self.packed is not None:
            return self._amx(x, bf16_out=True)
        rows = x.numel() // self.in_features
        if self.max_rows and rows > self.max_rows:
            flat = x.reshape(rows, self.in_features)
            pieces = [self._product(flat[start:start + self.max_rows]) for start in range(0, rows, self.max_rows)]
            return torch.cat(pieces).view(*x.shape[:-1], self.out_features)
        return self._product(x)

    def _amx(self, xb: torch.Tensor, bf16_out: bool) -> torch.Tensor:
        if self.scales is not None:
            return native.linear_int8(xb, self.packed, self.scales, self.out_features, bf16_out)
        return native.linear(xb, self.packed, self.out_features, bf16_out)

    def _product(self, xb: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return torch.ops.mkldnn._linear_pointwise(xb, self.parts[0][2], None, "none", [], "")
        out = None
        for start, stop, packed in self.parts:
            y = torch.ops.mkldnn._linear_pointwise(xb[..., start:stop].contiguous(), packed, None, "none", [], "").float()
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        if self.packed is not None:
            kernel = "amx" if self.scales is None else "amx, int8 weights"
        else:
            kernel = f"onednn=bfloat16x{len(self.parts)}" + (f", rows<={self.max_rows}" if self.max_rows else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kernel}"


def cpu_multiplies_bf16() -> str | None:
    """None when this CPU has native bfloat16 products (AVX-512 BF16 or AMX), else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "the CPU's flags are unreadable (/proc/cpuinfo)"
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return "the CPU has neither AVX-512 BF16 nor AMX (bfloat16 would be emulated, not faster)"
    return None


# Row counts the invariance check compares against one row alone: a decode batch, a busy one, a prefill.
CHECKED_ROWS = (2, 5, 13, 33, 300, 700)


def rows_invariant(layer: torch.nn.Module, in_features: int, rows=CHECKED_ROWS) -> bool:
    """Whether every row of ``layer``'s output, at each checked row count, has the same bits as that row
    computed alone. Every row: on AMX a few rows in the middle differ (5 of 37), so a sample misses them."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(max(rows), in_features, generator=gen)
    alone = torch.cat([layer(x[r:r + 1]) for r in range(max(rows))])
    return all(torch.equal(layer(x[:n]), alone[:n]) for n in rows)


def attention_invariant(kernel: bool | None = None) -> bool:
    """Whether the batch-invariant attention gives a decoding row's query the same bits alone, among
    longer rows, and as the last query of a prefill chunk (the three ways the engine computes it).
    ``kernel``: the compiled kernel (native.py) or attention.py's operators; by default the
    one the engine serves with (the kernel where it builds)."""
    reason = native.load()
    if kernel and reason:
        raise RuntimeError(f"the attention kernel is not available: {reason}")
    kernel = reason is None if kernel is None else kernel

    def attend(q, k, v, mask):  # mask: [B, 1, M, L], True where a query sees a key
        if kernel:
            return native.attend(q, k, v, mask[:, 0], 0.125)
        return attention.attend(q, k, v, attention.block_bias(mask), 0.125)

    gen = torch.Generator().manual_seed(2)
    heads, groups, dim, length, width = 3, 3, 64, 100, 7
    view = attention.padded_view(length)
    k, v = (torch.randn(1, heads, view, dim, generator=gen) for _ in range(2))
    q = torch.randn(1, heads, groups, dim, generator=gen)
    mask = torch.zeros(1, 1, groups, view, dtype=torch.bool)
    mask[..., :length] = True
    alone = attend(q, k, v, mask)[0]
    wide = attention.padded_view(length + 150)
    # views of longer rows, as the engine reads its cache (a row's capacity is the largest reservation)
    kb, vb = (torch.randn(4, heads, wide + 128, dim, generator=gen)[:, :, :wide] for _ in range(2))
    kb[2, :, :view], vb[2, :, :view] = k[0], v[0]
    qb = torch.randn(4, heads, groups, dim, generator=gen)
    qb[2] = q[0]
    maskb = torch.ones(4, 1, groups, wide, dtype=torch.bool)
    maskb[2, ..., length:] = False
    if not torch.equal(attend(qb, kb, vb, maskb)[2], alone):
        return False
    qp = torch.randn(1, heads, groups, width, dim, generator=gen)
    qp[0, :, :, -1] = q[0]
    causal = torch.arange(wide)[None, :] <= torch.arange(length - width, length)[:, None]
    maskp = causal[None, None, None].expand(1, 1, groups, width, wide).reshape(1, 1, groups * width, wide)
    grouped = qp.reshape(1, heads, groups * width, dim)
    out = attend(grouped, kb[2:3], vb[2:3], maskp)
    return torch.equal(out.view(1, heads, groups, width, dim)[0, :, :, -1], alone)


def product_layouts(model: torch.nn.Module) -> tuple[str | None, dict[tuple[int, int], Layout]]:
    """``(None, layouts)``: for each linear shape of ``model`` (``(out_features, in_features)``, its
    fused projections' too) the first of :data:`LAYOUTS` with which every row gets the same bits at
    any row count; else ``(why not, {})``."""
    shapes = {(m.out_features, m.in_features) for m in model.modules() if type(m) is torch.nn.Linear}
    shapes |= fused_shapes(model)
    layouts = {}
    with torch.inference_mode():
        for out_features, in_features in sorted(shapes):
            linear = torch.nn.Linear(in_features, out_features, bias=False, device="cpu")
            # lm_head-sized layers see one row per sequence, never a prefill's hundreds
            rows = CHECKED_ROWS if out_features * in_features < 2**24 else CHECKED_ROWS[:4]
            layouts[(out_features, in_features)] = next(
                (layout for layout in LAYOUTS
                 if rows_invariant(BF16Linear(linear, layout=layout), in_features, rows)), None)
            if layouts[(out_features, in_features)] is None:
                return (f"oneDNN's bfloat16 product {out_features}x{in_features} gives a row other bits among "
                        "other rows", {})
    return None, layouts


def check(model: torch.nn.Module) -> tuple[str | None, dict[tuple[int, int], Layout]]:
    """``(None, layouts)`` when bfloat16 linear layers keep the engine's promise for ``model`` on this
    machine (``layouts``: see :func:`product_layouts`), else ``(why not, {})``."""
    reason = cpu_multiplies_bf16()
    if reason:
        return reason, {}
    reason, layouts = product_layouts(model)
    if reason:
        return reason, {}
    with torch.inference_mode():
        if not attention_invariant():
            return "the batch-invariant attention gives a row other bits among other rows on this CPU", {}
    return None, layouts
