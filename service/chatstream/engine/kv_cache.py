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

import torch


class SlotKVCache:
    """KV buffers for up to ``max_batch`` sequences, grown on demand."""

    is_compileable = False

    GRANULARITY = 64  # positions per row are reserved in multiples of this

    def __init__(self, max_batch: int, initial_capacity: int = GRANULARITY):
        self.max_batch = max_batch
        self.capacity = initial_capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # What the next forward pass does; set by ``plan_decode``/``plan_prefill``.
        self._rows = (0, 0)
        self._view_len = 0
        self._decode_pos: torch.Tensor | None = None
        self._prefill: list[tuple[int, int, int, int]] = []  # (batch index, row, start, count)

    # -- planning a forward pass -------------------------------------------------
    def plan_decode(self, n: int, positions: torch.Tensor, view_len: int) -> None:
        """Rows ``[0, n)`` each write one token at ``positions[i]``."""
        self._rows = (0, n)
        self._decode_pos = positions
        self._prefill = []
        self._view_len = view_len
        self.ensure_capacity(view_len)

    def plan_prefill(self, first_row: int, chunks: list[tuple[int, int]], view_len: int) -> None:
        """Rows ``first_row + i`` write ``count`` tokens from ``start`` (one chunk each)."""
        self._rows = (first_row, first_row + len(chunks))
        self._decode_pos = None
        self._prefill = [(i, first_row + i, start, count) for i, (start, count) in enumerate(chunks)]
        self._view_len = view_len
        self.ensure_capacity(view_len)

    # -- the model's side ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.keys):
            self._allocate(layer_idx, key_states)
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        r0, r1 = self._rows
        if self._decode_pos is not None:
            rows = torch.arange(r0, r1, device=kb.device)
            kb[rows, :, self._decode_pos] = key_states[:, :, 0]
            vb[rows, :, self._decode_pos] = value_states[:, :, 0]
        else:
            width = key_states.shape[2]
            for i, row, start, count in self._prefill:
                kb[row, :, start:start + count] = key_states[i, :, width - count:]
                vb[row, :, start:start + count] = value_states[i, :, width - count:]
        return kb[r0:r1, :, : self._view_len], vb[r0:r1, :, : self._view_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._view_len

    # -- housekeeping --------------------------------------------------------------
    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        while len(self.keys) <= layer_idx:
            shape = (self.max_batch, like.shape[1], self.capacity, like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))

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
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                shape = (old.shape[0], old.shape[1], new_capacity, old.shape[3])
                new = torch.zeros(shape, dtype=old.dtype, device=old.device)
                new[:, :, :keep] = old[:, :, :keep]
                buffers[i] = new
        self.capacity = new_capacity

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first ``length`` positions from row ``src`` to ``dst``."""
        if src == dst or length <= 0:
            return
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[dst, :, :length] = buf[src, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        if a == b or length <= 0:
            return
        for buffers in (self.keys, self.values):
            for buf in buffers:
                tmp = buf[a, :, :length].clone()
                buf[a, :, :length] = buf[b, :, :length]
                buf[b, :, :length] = tmp


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
