"""Attention whose result for a query does not depend on its batch or on the padded view.

Why: the engine promises that batching and the prefix cache never change a greedy answer. In float32
that holds with PyTorch's SDPA, but only to the last bit or so: SDPA's reduction over the cached
positions follows the length of the KV view, and the view is as long as the batch's longest row, so a
row's attention output moves by an ulp when a longer neighbour joins (6e-8 to 2.4e-7 in
bench/results/2026-12-04-bf16-linear.md). With bfloat16 linear layers an ulp of float32 that lands
near a bfloat16 rounding boundary becomes an ulp of bfloat16, 2^16 times larger, and 2 of 8 greedy
answers changed with the batch.

:func:`attend` computes every query against keys in blocks of :data:`BLOCK` positions, in the same
order whatever the view's length, and only ever adds exact zeros for what a query does not see:

* scores: one product per block of ``BLOCK`` keys (the reduction is over ``head_dim``, whose size is
  fixed), masked to ``-inf``; the maximum is exact in any order;
* the softmax's denominator and the weighted sum of values: a fixed-size sum inside each block, then a
  sequential sum over the blocks (``cumsum``, which runs in index order), so blocks past a query's own
  length add exact zeros at the end and change no bit.

A decoding row (one query over its cache row), the same position in a prefill chunk, and the same
position prefilled afresh after a prefix-cache hit therefore get the same bits (tests/engine/
test_attention.py checks it against batches of other lengths). It is not SDPA's arithmetic, so its
float32 result differs from transformers' in the last bits: the engine uses it only with bfloat16
linear layers (``linear_dtype``), never for the float32 path that equals ``generate``, and only where
the compiled kernel (native.py), which keeps the same promise in one call a layer, cannot
be built.
"""

from __future__ import annotations

import torch

BLOCK = 64  # positions per block; the KV cache reserves rows in multiples of this (kv_cache.GRANULARITY)
# The fewest query rows a product is computed with. PyTorch's CPU matmul (MKL) takes another kernel for
# fewer than 4 rows, and a row's bits then differ from the same row among more (measured on the AMD
# EPYC of bench/results: 1-3 rows agree with each other, 4 to 600 rows agree with each other, the two
# groups do not). A decoding row's queries (one per head of a key/value group, 3 for SmolLM2-135M) are
# padded with zero rows up to this, so that they meet the same kernel as a prefill chunk's.
MIN_ROWS = 4


def padded_view(view_len: int) -> int:
    """The view length :func:`attend` reads: ``view_len`` rounded up to whole blocks."""
    return -(-view_len // BLOCK) * BLOCK


def block_bias(mask: torch.Tensor) -> torch.Tensor:
    """The additive form of ``mask`` (``[B, 1, M, L]``, boolean, True where a query sees a key) that
    :func:`attend` takes: ``[B, 1, L / BLOCK, M, BLOCK]``, 0 where seen, ``-inf`` elsewhere. Made once a
    pass, shared by every layer."""
    b, _, m, length = mask.shape
    blocked = mask.reshape(b, 1, m, length // BLOCK, BLOCK).transpose(2, 3)
    return torch.zeros(blocked.shape).masked_fill_(~blocked, float("-inf"))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Attention of ``q`` (``[B, kv_heads, M, head_dim]``: each key/value head's queries, grouped)
    over ``keys``/``values`` (``[B, kv_heads, L, head_dim]``, ``L`` a multiple of :data:`BLOCK`; views of
    longer cache rows are read in place, not copied) with ``bias`` = :func:`block_bias` of the mask;
    ``[B, kv_heads, M, head_dim]``.

    Every query must see at least one key. Positions a query does not see may hold anything finite.
    """
    b, h, m, d = q.shape
    n = keys.shape[2] // BLOCK
    # [B, h, n, M, BLOCK]: each (query, key) score is one product over head_dim, whatever L is; -inf where unseen
    scores = torch.matmul(_pad_rows(q), keys.transpose(-1, -2))[..., :m, :]
    scores = scores.view(b, h, m, n, BLOCK).transpose(2, 3).mul_(scale).add_(bias)
    top = scores.amax(dim=(2, 4), keepdim=True)  # a maximum: the same in any order
    weights = scores.sub_(top).exp_()            # exact zeros where unseen
    # Sums over blocks in index order: trailing blocks of zeros leave the sum as it was.
    denominator = _in_order(weights.sum(-1, keepdim=True))                 # [B, h, M, 1]
    # The weighted values: one product per block, accumulated in index order. A view of a cache row is
    # not one batch of blocks (its rows are further apart than its length), so the blocks are a loop
    # over [B * h] batches, each read in place.
    padded = _pad_rows(weights).flatten(0, 1)  # [B * h, n, P, BLOCK]
    rows = values.flatten(0, 1)                # [B * h, L, d], a view
    out = torch.bmm(padded[:, 0], rows[:, :BLOCK])
    for j in range(1, n):
        out.baddbmm_(padded[:, j], rows[:, j * BLOCK:(j + 1) * BLOCK])
    return out.view(b, h, -1, d)[..., :m, :] / denominator


def _in_order(blocks: torch.Tensor) -> torch.Tensor:
    """The sum over dimension 2 (blocks), added in index order (a cumulative sum's last element)."""
    return blocks[:, :, 0] if blocks.shape[2] == 1 else blocks.cumsum(2)[:, :, -1]


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zero rows added (dimension -2) up to :data:`MIN_ROWS`."""
    short = MIN_ROWS - x.shape[-2]
    return x if short <= 0 else torch.cat([x, x.new_zeros(*x.shape[:-2], short, x.shape[-1])], -2)


