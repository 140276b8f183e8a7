"""A slot-based KV cache shared by every sequence the engine is running.

Each running sequence owns one row ("slot") of a preallocated buffer per layer,
shaped ``[max_batch, kv_heads, capacity, head_dim]``. A sequence writes its
keys and values at its own positions, so sequences of different lengths share
one forward pass without padding their caches or shifting them: a decode step
writes one column per row in place and attends over a view of the buffer.

Rows ``[0, n)`` are kept contiguous (finished sequences are replaced by the last
row) so that a batch is always a plain slice, never a gather.

The object is handed to the model as its cache; the model only calls
``update``. The attention mask is built by the engine (a 4D mask, which
transformers passes through unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import native


@dataclass
class Plan:
    """What one forward pass (or one part of a mixed pass) writes: rows ``rows[0]..rows[1]`` and the
    first ``view_len`` positions of each row that its queries see."""
    rows: tuple[int, int]
    view_len: int
    decode_positions: torch.Tensor | None = None  # one position per row: a decode pass
    decode_rows: torch.Tensor | None = None       # the rows' indexes, made once a pass
    prefill: list[tuple[int, int, int, int]] = field(default_factory=list)  # (batch index, row, start, count)

    def views(self, *buffers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the pass's queries attend to in a layer's buffers (keys, values, and their scales where the
        cache has them): its rows, ``view_len`` positions each."""
        r0, r1 = self.rows
        return tuple(b[r0:r1, :, :self.view_len] for b in buffers)


class SlotKVCache:
    """KV buffers for up to ``max_batch`` sequences, grown on demand."""

    is_compileable = False

    GRANULARITY = 64  # positions per row are reserved in multiples of this

    def __init__(self, max_batch: int, initial_capacity: int = GRANULARITY, dtype: torch.dtype | None = None):
        self.max_batch = max_batch
        # What keys and values are kept in: None, the model's own dtype; the engine's bfloat16 mode keeps
        # them in bfloat16 (half the bytes a decode step reads; ModelRunner.serve_invariant says why), its
        # int8 mode in int8, with a float32 scale per position and head (written and read by the compiled
        # kernels alone: layer_kernel.cpp's rotary quantizes them).
        self.dtype = dtype
        self.capacity = initial_capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_scales: list[torch.Tensor] = []    # [max_batch, kv_heads, capacity] per layer, int8 only
        self.value_scales: list[torch.Tensor] = []
        self._plan: Plan | None = None  # what ``update`` does when the model calls it without a plan

    # -- planning a forward pass -------------------------------------------------
    def plan_decode(self, n: int, positions: torch.Tensor, view_len: int) -> Plan:
        """Rows ``[0, n)`` each write one token at ``positions[i]``."""
        self.ensure_capacity(view_len)
        self._plan = Plan((0, n), view_len, decode_positions=positions,
                          decode_rows=torch.arange(n, device=positions.device))
        return self._plan

    def plan_prefill(self, first_row: int, chunks: list[tuple[int, int]], view_len: int) -> Plan:
        """Rows ``first_row + i`` write ``count`` tokens from ``start`` (one chunk each)."""
        self.ensure_capacity(view_len)
        self._plan = Plan((first_row, first_row + len(chunks)), view_len,
                          prefill=[(i, first_row + i, start, count) for i, (start, count) in enumerate(chunks)])
        return self._plan

    # -- the model's side ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               plan: Plan | None = None, **kwargs):
        """Write a pass's keys and values (``[rows, kv_heads, width, head_dim]``; a prefill's chunks
        right-aligned in ``width``) and return the views its queries attend to.

        transformers calls this with the plan of the last ``plan_*`` call; the engine's own forward
        pass hands each part of a mixed pass its own ``plan``."""
        plan = plan or self._plan
        if self.dtype == torch.int8:
            raise RuntimeError("int8 keys and values are written by the compiled kernels only")
        kb, vb = self.buffers(layer_idx, key_states)
        if plan.decode_positions is not None:
            kb[plan.decode_rows, :, plan.decode_positions] = key_states[:, :, 0].to(kb.dtype)
            vb[plan.decode_rows, :, plan.decode_positions] = value_states[:, :, 0].to(vb.dtype)
        else:
            width = key_states.shape[2]
            for i, row, start, count in plan.prefill:
                kb[row, :, start:start + count] = key_states[i, :, width - count:]
                vb[row, :, start:start + count] = value_states[i, :, width - count:]
        return plan.views(kb, vb)

    def buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s key and value buffers, made for keys shaped like ``like`` ([*, kv_heads, *,
        head_dim]) when it has none yet."""
        if layer_idx >= len(self.keys):
            self._allocate(layer_idx, like)
        return self.keys[layer_idx], self.values[layer_idx]

    def layer(self, layer_idx: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Layer ``layer_idx``'s buffers (:meth:`buffers`), and the keys' and values' scales where the cache
        is int8."""
        self.buffers(layer_idx, like)  # allocates the layer
        return [buffers[layer_idx] for buffers in self._lists()]

    def layers(self) -> list[list[torch.Tensor]]:
        """Every allocated layer's buffers, as :meth:`layer` gives them."""
        return [list(t) for t in zip(*self._lists())]

    def spans(self) -> list[torch.Tensor]:
        """Every allocated buffer, layer after layer in :meth:`layer`'s order: what a row's span is copied
        across."""
        return [t for layer in self.layers() for t in layer]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._plan.view_len if self._plan else 0

    # -- housekeeping --------------------------------------------------------------
    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        while len(self.keys) <= layer_idx:
            shape = (self.max_batch, like.shape[1], self.capacity, like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=self.dtype or like.dtype, device=like.device))
            self.values.append(torch.zeros(shape, dtype=self.dtype or like.dtype, device=like.device))
            if self.dtype == torch.int8:
                for scales in (self.key_scales, self.value_scales):
                    scales.append(torch.zeros(shape[:3], dtype=torch.float32, device=like.device))

    def _lists(self) -> list[list[torch.Tensor]]:
        """The per-layer lists of buffers: keys, values, and their scales where the cache is int8."""
        return [self.keys, self.values] + ([self.key_scales, self.value_scales] if self.dtype == torch.int8 else [])

    def ensure_capacity(self, length: int) -> None:
        """Room for ``length`` positions per row (the engine reserves a sequence's whole extent on admission)."""
        if length > self.capacity:
            self._resize(_round_up(length, self.GRANULARITY))

    def shrink(self) -> None:
        """Give memory back: the engine calls this when nothing has run for a while."""
        if self.capacity > self.GRANULARITY:
            self._resize(self.GRANULARITY)

    def _resize(self, new_capacity: int) -> None:
        keep = min(self.capacity, new_capacity)
        for buffers in self._lists():
            for i, old in enumerate(buffers):
                shape = (old.shape[0], old.shape[1], new_capacity, *old.shape[3:])
                new = torch.zeros(shape, dtype=old.dtype, device=old.device)
                new[:, :, :keep] = old[:, :, :keep]
                buffers[i] = new
        self.capacity = new_capacity

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first ``length`` positions from row ``src`` to ``dst``."""
        if src == dst or length <= 0:
            return
        if native.loaded():  # one call for every layer's buffers
            every = self.spans()
            native.copy_spans(every, src, every, dst, length)
            return
        for buffers in self._lists():
            for buf in buffers:
                buf[dst, :, :length] = buf[src, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        if a == b or length <= 0:
            return
        for buffers in self._lists():
            for buf in buffers:
                tmp = buf[a, :, :length].clone()
                buf[a, :, :length] = buf[b, :, :length]
                buf[b, :, :length] = tmp


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
