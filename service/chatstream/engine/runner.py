"""The forward pass: inputs, 4D masks and positions for the scheduler's plan, the KV cache, sampling.

The runner turns a plan into tensors and the model's answer into next tokens
(:meth:`ModelRunner.execute`); it decides nothing about which sequence runs. The model writes keys and values
through :class:`SlotKVCache` (one row per running sequence); the runner tells
the cache what the next pass writes (``plan_prefill`` / ``plan_decode``) and
applies the row moves the scheduler asks for.
"""

from __future__ import annotations

import inspect

import torch

from . import attention, llama_forward, native
from .architectures import FULL, attention_windows
from .kv_cache import SlotKVCache
from .prefix_cache import Drop, Save
from .sampling import sample
from .scheduler import Chunk, Move, StepPlan
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model, max_batch: int, native: bool = True):
        self.model = model
        # What each layer type attends to (a window, or every earlier position); ModelLoadError for a model
        # the engine does not serve (architectures.py).
        self.windows = attention_windows(model)
        # Llama models run through llama_forward.py (same arithmetic, less Python); others through transformers.
        self.native = native
        self._native_for = self._native_forward = None
        # Batch-invariant attention (attention.py) in the engine's own Llama pass, with views padded to
        # whole blocks: set when the linear layers serve in bfloat16 (Engine._prepare_model).
        self.invariant = self._native_forward_invariant = False
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache(max_batch)
        self.kept: dict[int, list[torch.Tensor]] = {}  # prefix cache entries: each buffer of SlotKVCache.spans, its span
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # sdpa and flash attention take a boolean mask; eager attention wants an additive one.
        self._bool_mask = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "flash_attention_2")

    # -- cache ----------------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Room for ``length`` positions per row (a sequence's whole extent, reserved on admission)."""
        self.cache.ensure_capacity(length)

    def apply(self, orders: list[Move | Save | Drop]) -> None:
        """Row moves and prefix-cache orders from the scheduler, in their order."""
        cache = self.cache
        for order in orders:
            if isinstance(order, Move):
                if order.swap:
                    cache.swap_rows(order.src, order.dst, order.length)
                else:
                    cache.move_row(order.src, order.dst, order.length)
            elif isinstance(order, Save):
                row, n, every = order.row, order.length, cache.spans()
                self.kept[order.key] = (native.clone_spans(every, row, n) if native.loaded()
                                        else [t[row, :, :n].clone() for t in every])
            else:
                self.kept.pop(order.key, None)

    def load(self, row: int, key: int, length: int) -> None:
        """Copy the first ``length`` positions of kept entry ``key`` into cache row ``row``."""
        kept, every = self.kept[key], self.cache.spans()
        if native.loaded():
            native.copy_spans(kept, -1, every, row, length)
            return
        for t, buf in zip(kept, every):
            buf[row, :, :length] = t[:, :length]

    @property
    def kept_bytes(self) -> int:
        entries = list(self.kept.values())  # read from other threads too
        return sum(t.numel() * t.element_size() for entry in entries for t in entry)

    def shrink(self) -> None:
        self.cache.shrink()

    # -- forward --------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> list[int | Exception]:
        """Run ``plan``'s forward pass and sample: the next token of each of ``plan.sampled``, in that order,
        or the exception its sampling raised (the others are unaffected). Raises if the pass fails."""
        prefill_logits, decode_logits = self.step(plan.chunks, plan.decode)
        done = [i for i, chunk in enumerate(plan.chunks) if chunk.completes]
        firsts = self.sample(prefill_logits[done], [plan.chunks[i].seq for i in done]) if done else []
        return firsts + (self.sample(decode_logits, plan.decode) if plan.decode else [])

    def step(self, chunks: list[Chunk], batch: list[Sequence]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One step: prefill ``chunks`` (rows after the decoding ones) and advance rows ``[0, len(batch))``
        by their ``next_token``. The logits of each chunk's last token and of each decoding row
        (``[n, vocab]`` each; None for an empty part).

        The engine's own Llama pass runs both parts as one pass over their tokens, so a step reads the
        weights once, as vLLM's does; through transformers they are two passes.
        """
        native = self._native()
        if native is None:
            return (self._hf_prefill(chunks) if chunks else None, self._hf_decode(batch) if batch else None)
        logits = native(self._pass(chunks, batch), self.cache)
        d = len(batch)
        return (logits[d:] if chunks else None, logits[:d] if batch else None)

    def logits_of(self, ids: list[int], chunk: int = 512) -> torch.Tensor:
        """The logits after each token of ``ids`` (``[len(ids), vocab]``) through the pass the engine serves,
        prefilled into row 0 in chunks of ``chunk`` (bench/dtype_quality.py measures perplexity with it, so
        that it measures what is served: bfloat16 keys, the compiled steps). Row 0 must be free; only the
        engine's own Llama pass returns every position's logits (ValueError otherwise)."""
        native = self._native()
        if native is None:
            raise ValueError("logits_of needs the engine's own Llama pass")
        seq = Sequence(list(ids), None, lambda event: None, row=0)
        self.reserve(len(ids))
        out = []
        for start in range(0, len(ids), chunk):
            p = self._pass([Chunk(seq, start, min(chunk, len(ids) - start))], [])
            p.last = torch.arange(len(p.ids), device=self.device)  # one chunk, no padding: every token
            out.append(native(p, self.cache))
        return torch.cat(out)

    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """A step of prompt chunks alone; the logits of each chunk's last token ([n, vocab])."""
        return self.step(chunks, [])[0]

    def decode(self, batch: list[Sequence]) -> torch.Tensor:
        """A step of decoding rows ``[0, n)`` alone; their next-token logits ([n, vocab])."""
        return self.step([], batch)[1]

    def serve_invariant(self, kv_dtype: torch.dtype = torch.bfloat16) -> None:
        """The bfloat16 mode: batch-invariant attention, and where the compiled kernel serves it
        (native.py) keys and values kept in bfloat16, as vLLM keeps them in its default dtype, or in
        ``kv_dtype`` int8 (the int8 mode) where the compiled pass serves the whole layer.

        Why bfloat16 keys and values: at 16 rows of 400 positions a decode step reads 295 MB of float32
        keys and values, more than SmolLM2-135M's bfloat16 weights, at about 11 GB/s a core on the 2-core
        Intel Xeon of bench/results; the kernel reads half the bytes in bfloat16 (its attention over
        30 layers went from about 17 to 10 ms there). int8 with a float32 scale per position and head
        reads 53% of bfloat16's bytes again. A key is rounded once, when it is written, so a row's bits
        still do not depend on its batch or on the prefix cache. Call it before the first pass.
        """
        self.invariant = True
        native = self._native()
        if native is not None and native.kernel and not self.cache.keys:
            int8 = kv_dtype == torch.int8 and native.layers() is not None  # only the compiled pass writes int8
            self.cache.dtype = torch.int8 if int8 else torch.bfloat16

    def _native(self) -> llama_forward.LlamaForward | None:
        model = self.model
        if self._native_for is not model or self._native_forward_invariant != self.invariant:
            # built per model (tests swap in another one) and per attention
            self._native_for, self._native_forward_invariant = model, self.invariant
            reason = llama_forward.unsupported(model) if self.native else "turned off"
            if self.windows != {FULL: None}:
                reason = reason or "the model has a sliding window"
            self._native_forward = None if reason else llama_forward.LlamaForward(model, self.invariant)
        return self._native_forward

    def _pass(self, chunks: list[Chunk], batch: list[Sequence]) -> llama_forward.Pass:
        ids, positions, last = [], [], list(range(len(batch)))
        p = llama_forward.Pass(decode=len(batch))
        if batch:
            decode_ids, lengths, p.decode_mask, p.decode_plan = self._decode_inputs(batch)
            ids.append(decode_ids.view(-1))
            positions.append(lengths.view(-1))
        if chunks:
            chunk_ids, chunk_pos, p.prefill_mask, p.prefill_plan = self._prefill_inputs(chunks)
            n, width = chunk_ids.shape
            ids.append(chunk_ids.view(-1))
            positions.append(chunk_pos.view(-1))
            last.extend(len(batch) + (i + 1) * width - 1 for i in range(n))  # right-aligned: the row's end
            p.chunks = (n, width)
        p.ids, p.positions = torch.cat(ids), torch.cat(positions)
        p.last = torch.tensor(last, device=self.device)
        return p

    def _decode_inputs(self, batch: list[Sequence]):
        """Token ids and positions (``[n, 1]``), the attention mask and the cache plan of a decode pass."""
        lengths = torch.tensor([s.length for s in batch])
        view_len = self._view(int(lengths.max()) + 1)
        ids = torch.tensor([[s.next_token] for s in batch], dtype=torch.long)
        mask = self._masks(lengths[:, None], view_len)
        lengths = lengths.to(self.device)
        plan = self.cache.plan_decode(len(batch), lengths, view_len)
        return ids.to(self.device), lengths[:, None], mask, plan

    def _prefill_inputs(self, chunks: list[Chunk]):
        """Token ids and positions (``[n, width]``), the attention mask and the cache plan of a prefill pass.

        Chunks are right-aligned in an ``[n, width]`` batch; a padding slot holds token 0 at its chunk's
        first position, attends to column 0 only (so its softmax is defined), and its key is never written.
        """
        n, width = len(chunks), max(c.count for c in chunks)
        view_len = self._view(max(c.start + c.count for c in chunks))
        ids = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        absolute = torch.full((n, width), -1, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, width - c.count:] = torch.tensor(c.seq.prompt_ids[c.start:c.start + c.count], dtype=torch.long)
            span = torch.arange(c.start, c.start + c.count)
            pos[i, width - c.count:] = span
            pos[i, : width - c.count] = c.start
            absolute[i, width - c.count:] = span
        mask = self._masks(absolute, view_len)
        plan = self.cache.plan_prefill(chunks[0].seq.row, [(c.start, c.count) for c in chunks], view_len)
        return ids.to(self.device), pos.to(self.device), mask, plan

    def _view(self, view_len: int) -> int:
        """The positions a pass's queries attend over: the invariant attention reads whole blocks
        (attention.BLOCK), as a view of each cache row, never the row's whole capacity (a conversation's
        rows reserve their answer's room too, and the capacity is the largest reservation so far)."""
        return attention.padded_view(view_len) if self.invariant else view_len

    def _masks(self, queries: torch.Tensor, view_len: int):
        """The boolean masks (``[n, 1, q, view_len]``) of queries at absolute positions ``queries`` (``[n, q]``;
        -1 for padding): a query at ``p`` sees the keys at ``p - window < k <= p`` (every ``k <= p`` without a
        window), a padding query key 0 only. One mask when every layer sees the same, else one per layer type."""
        keys = torch.arange(view_len)[None, None, :]
        queries = queries[:, :, None]
        masks = {}
        for kind, window in self.windows.items():
            mask = keys <= queries
            if window is not None:
                mask &= keys > queries - window
            mask[:, :, 0] |= queries[:, :, 0] < 0
            masks[kind] = mask[:, None].to(self.device)
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _hf(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        if not self._bool_mask:
            mask = {k: self._additive(m) for k, m in mask.items()} if isinstance(mask, dict) else self._additive(mask)
        out = model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                    logits_to_keep=1, **{self._cache_kwarg: self.cache})
        return out.logits[:, -1, :]

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    def _hf_prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        return self._hf(*self._prefill_inputs(chunks)[:3])

    def _hf_decode(self, batch: list[Sequence]) -> torch.Tensor:
        return self._hf(*self._decode_inputs(batch)[:3])

    # -- sampling -------------------------------------------------------------------------
    def new_generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        return generator

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
        """The next token of each sequence, or the exception its sampling raised (the others are unaffected)."""
        try:
            seen = [self._seen(s) for s in seqs]
        except Exception as exc:  # not expected; still not a reason to fail more than these sequences
            return [exc] * len(seqs)
        return sample(logits, [s.params for s in seqs], seen, [s.generator for s in seqs])

    def _seen(self, seq: Sequence) -> torch.Tensor | None:
        if seq.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(seq.prompt_ids + seq.generated, device=self.device).unique()

