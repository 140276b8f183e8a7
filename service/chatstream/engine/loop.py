"""The generation loop: one thread, one forward pass per step for every stream.

Each step admits waiting requests into free cache rows, runs one prefill pass
over a bounded number of prompt tokens (long prompts are split into chunks so
that running streams are never stalled for long; the bound is smaller while
streams are decoding), then one decode pass that
advances every running sequence by one token. Consumers are told about new
text through a callback called on this thread; they hand it to their event
loop themselves.
"""

from __future__ import annotations

import collections
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cpu_linear import pack_linears
from .detokenize import IncrementalDetokenizer, StopMatcher
from .events import Delta, Failed, Finished
from .kv_cache import SlotKVCache
from .sampling import SamplingParams, sample

log = logging.getLogger("chatstream.engine")


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[object], None]
    generated: list[int] = field(default_factory=list)
    row: int = -1
    length: int = 0            # positions of this sequence held in the cache
    next_token: int | None = None
    state: str = "waiting"     # waiting | prefill | decode | done
    cancelled: bool = False
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    generator: torch.Generator | None = None


class Engine:
    """Continuous batching over a :class:`SlotKVCache`."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_context: int = 2048,
                 prefill_tokens: int = 512, prefill_tokens_decoding: int = 128, eos_token_ids: list[int] | None = None,
                 cpu_linear: str = "onednn", idle_shrink_seconds: float = 5.0):
        if cpu_linear not in ("onednn", "torch"):
            raise ValueError(f"cpu_linear must be 'onednn' or 'torch', not {cpu_linear!r}")
        self.model = model
        # On the CPU, swap the model's linear layers for oneDNN prepacked ones (cpu_linear.py says why).
        self.packed_linears = pack_linears(model) if cpu_linear == "onednn" else 0
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_context = max_context
        # A prefill pass stalls every decoding row: with rows decoding it takes fewer prompt tokens
        # (128 halved inter-token p99 at 32 clients on 2 CPU cores against 512, for about the same tok/s).
        self.prefill_tokens = prefill_tokens
        self.prefill_tokens_decoding = min(prefill_tokens, prefill_tokens_decoding)
        self.eos = set(eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tokenizer))
        self.cache = SlotKVCache(max_batch)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._bool_mask = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "flash_attention_2")
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._decoding: list[Sequence] = []     # rows [0, d)
        self._prefilling: list[Sequence] = []   # rows [d, d + p)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # The cache gives memory back after this long with nothing to do (not at every gap between requests,
        # which would reallocate it for the next one).
        self.idle_shrink_seconds = idle_shrink_seconds
        self.steps = 0

    # -- public, thread-safe --------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatstream-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[object], None]) -> Sequence:
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}")
        seq = Sequence(list(prompt_ids), params, on_event)
        self._inbox.put(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._wake.set()

    @property
    def active(self) -> int:
        return len(self._decoding) + len(self._prefilling)

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        idle_since = None
        with torch.inference_mode():
            while not self._stopping:
                self._drain_inbox()
                self._reap_cancelled()
                if not (self._waiting or self._prefilling or self._decoding):
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if now - idle_since >= self.idle_shrink_seconds:
                        self.cache.shrink()
                    self._wake.wait(min(0.5, self.idle_shrink_seconds))
                    self._wake.clear()
                    continue
                idle_since = None
                try:
                    self._admit()
                    if self._prefilling:
                        self._prefill_step()
                    if self._decoding:
                        self._decode_step()
                    self.steps += 1
                except Exception as exc:  # a broken step fails its streams, not the server
                    log.exception("generation step failed")
                    self._fail_all(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled", remove=False)
        for seq in [s for s in self._decoding + self._prefilling if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while self._waiting and self.active < self.max_batch:
            seq = self._waiting.popleft()
            seq.row = self.active
            seq.state = "prefill"
            # Reserve the sequence's whole extent now: the cache never grows mid-stream.
            self.cache.ensure_capacity(min(len(seq.prompt_ids) + seq.params.max_new_tokens, self.max_context))
            seq.detok = IncrementalDetokenizer(self.tokenizer)
            seq.stops = StopMatcher(seq.params.stop)
            seq.generator = torch.Generator(device=self.device)
            if seq.params.seed is not None:
                seq.generator.manual_seed(seq.params.seed)
            else:
                seq.generator.seed()
            self._prefilling.append(seq)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self._bool_mask:
            mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.model.dtype).min)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: self.cache})
        return out.logits[:, -1, :]

    def _prefill_step(self) -> None:
        budget = self.prefill_tokens_decoding if self._decoding else self.prefill_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in sorted(self._prefilling, key=lambda s: s.row):
            if budget <= 0:
                break
            count = min(len(seq.prompt_ids) - seq.length, budget)
            batch.append((seq, count))
            budget -= count
        width = max(count for _, count in batch)
        view_len = max(seq.length + count for seq, count in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        absolute = torch.full((len(batch), width), -1, dtype=torch.long)
        for i, (seq, count) in enumerate(batch):
            chunk = seq.prompt_ids[seq.length:seq.length + count]
            ids[i, width - count:] = torch.tensor(chunk)
            span = torch.arange(seq.length, seq.length + count)
            pos[i, width - count:] = span
            pos[i, : width - count] = seq.length
            absolute[i, width - count:] = span
        cols = torch.arange(view_len)
        mask = cols[None, None, :] <= absolute[:, :, None]
        mask[:, :, 0] |= absolute < 0  # padding queries look at one column, so softmax has something
        first_row = min(seq.row for seq, _ in batch)
        self.cache.plan_prefill(first_row, [(seq.length, count) for seq, count in batch], view_len)
        logits = self._forward(ids.to(self.device), pos.to(self.device), mask[:, None].to(self.device))
        done: list[tuple[int, Sequence]] = []
        for i, (seq, count) in enumerate(batch):
            seq.length += count
            if seq.length == len(seq.prompt_ids):
                done.append((i, seq))
        if not done:
            return
        picks = sample(logits[[i for i, _ in done]], [s.params for _, s in done],
                       [self._seen(s) for _, s in done], [s.generator for _, s in done])
        for (_, seq), token in zip(done, picks):
            self._promote(seq)
            self._accept(seq, token)

    def _decode_step(self) -> None:
        seqs = self._decoding
        n = len(seqs)
        lengths = torch.tensor([s.length for s in seqs])
        view_len = int(lengths.max()) + 1
        ids = torch.tensor([[s.next_token] for s in seqs])
        mask = torch.arange(view_len)[None, :] <= lengths[:, None]
        self.cache.plan_decode(n, lengths.to(self.device), view_len)
        logits = self._forward(ids.to(self.device), lengths[:, None].to(self.device), mask[:, None, None].to(self.device))
        picks = sample(logits, [s.params for s in seqs], [self._seen(s) for s in seqs], [s.generator for s in seqs])
        batch = list(seqs)
        for seq in batch:  # every row's new column is in the cache before any row moves
            seq.length += 1
        for seq, token in zip(batch, picks):
            self._accept(seq, token)

    def _seen(self, seq: Sequence) -> torch.Tensor | None:
        if seq.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(seq.prompt_ids + seq.generated, device=self.device).unique()

    def _accept(self, seq: Sequence, token: int) -> None:
        """A new token was sampled for ``seq``: emit it or finish the sequence."""
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        if token in self.eos:
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        seq.next_token = token
        text, stopped = seq.stops.feed(seq.detok.push(token))
        if text:
            seq.on_event(Delta(text, len(seq.generated)))
        if stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.params.max_new_tokens or seq.length + 1 >= self.max_context:
            self._finish(seq, "length")

    # -- rows -------------------------------------------------------------------------
    def _promote(self, seq: Sequence) -> None:
        """A prefilled sequence joins the decoding rows at row d."""
        d = len(self._decoding)
        other = next((s for s in self._prefilling if s.row == d), None)
        if other is not None and other is not seq:
            self.cache.swap_rows(seq.row, d, max(seq.length, other.length))
            other.row = seq.row
        seq.row = d
        self._prefilling.remove(seq)
        self._decoding.append(seq)
        seq.state = "decode"

    def _remove_row(self, seq: Sequence) -> None:
        d = len(self._decoding)
        if seq.state == "decode":
            last = self._decoding[-1]
            if last is not seq:
                self.cache.move_row(last.row, seq.row, last.length)
                last.row = seq.row
                i = self._decoding.index(seq)
                self._decoding[i] = last
            self._decoding.pop()
            free = d - 1
        else:
            self._prefilling.remove(seq)
            free = seq.row
        tail = max(self._prefilling, key=lambda s: s.row, default=None)
        if tail is not None and tail.row > free:
            self.cache.move_row(tail.row, free, tail.length)
            tail.row = free

    def _finish(self, seq: Sequence, reason: str, remove: bool = True) -> None:
        if seq.state == "done":
            return
        if remove and seq.state in ("prefill", "decode"):
            self._remove_row(seq)
        seq.state = "done"
        if reason != "cancelled" and seq.stops is not None:
            rest = seq.stops.flush()
            if rest:
                seq.on_event(Delta(rest, len(seq.generated)))
        seq.on_event(Finished(reason, len(seq.prompt_ids), len(seq.generated)))

    def _fail_all(self, exc: Exception) -> None:
        for seq in list(self._decoding) + list(self._prefilling):
            seq.state = "done"
            seq.on_event(Failed(exc))
        self._decoding.clear()
        self._prefilling.clear()


def default_eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return sorted(ids)
