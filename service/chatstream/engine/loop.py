"""The engine: one thread, one forward pass per step for every stream.

The work is split three ways, as in vLLM, each part knowing nothing of the others:

- :class:`~.scheduler.Scheduler` (pure, no model): who is admitted to which cache
  row, which prompt chunks go through the next pass under the token budget, the
  decoding rows, and the row moves when a sequence finishes or is promoted;
- :class:`~.runner.ModelRunner`: tensors, 4D masks and positions for that plan,
  the KV cache, the forward pass and sampling;
- :class:`~.output.OutputProcessor`: detokenizing, stop strings, EOS and length,
  the events a consumer receives.

A step (:meth:`Engine._step`) is vLLM's ``EngineCore.step``: the scheduler's
plan, the runner's pass over it, the scheduler's update, then each new token
through the output processor to its consumer.

:class:`Engine` owns the thread and the public, thread-safe API, and the rule
for failures: whatever goes wrong with one sequence (its admission, its
sampling, its text, its consumer's callback raising) fails that sequence only;
a failed forward pass fails the sequences of that pass. Consumers are told
about new text through a callback called on the engine thread; they hand it to
their event loop themselves.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import torch

from . import bf16_linear
from . import cpu_linear as linear_kernels
from . import native as native_kernels
from .events import Failed, Finished
from .output import OutputProcessor
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, State

log = logging.getLogger("chatstream.engine")

__all__ = ["Engine", "Sequence", "default_eos_ids"]

KV_CACHE_DTYPES = ("auto", "bfloat16", "int8")


class Engine:
    """Continuous batching over a slot KV cache, on a thread of its own.

    The engine takes ownership of ``model``. On the CPU, ``cpu_linear`` says which kernel serves its
    linear layers: ``"auto"`` (the default) measures PyTorch's against oneDNN's prepacked one on this
    CPU (about a second at start) and serves with the faster, ``"onednn"`` packs without measuring,
    ``"torch"`` never packs (cpu_linear.prepare_linears). Packing replaces every ``nn.Linear`` of the
    model, in place, by a layer holding its weight prepacked for oneDNN: the weights are moved, not
    copied, so serving costs no second copy of the model. The model still computes the same function
    afterwards, but it no longer holds ``nn.Linear`` layers or their weights: do not train it or save
    its ``state_dict``. Packing a shallow clone instead would leave the caller's layers intact only by
    keeping both the original and the packed weights: on SmolLM2-135M in float32 (513 MiB of weights)
    packing in place grows the resident size by 110 MiB (the tied embedding), packing a clone by 620 MiB.
    ``engine.cpu_linear`` says which kernel serves, ``engine.linear_timings`` what was measured.
    ``linear_dtype`` "bfloat16" runs a float32 model's products in bfloat16 with the batch-invariant
    attention, "auto" (or ``cpu_linear="bfloat16"``) does so where this CPU passes bf16_linear.check;
    ``engine.linear_dtype`` says which serves. float32 (the default) equals transformers' ``generate``.
    ``cpu_linear="int8"`` is "bfloat16" with int8 weights where the CPU has AMX (``engine.int8_weights``).
    ``kv_cache_dtype`` says what those two modes keep keys and values in: "auto" (int8 with int8 weights, else
    bfloat16), "bfloat16" or "int8" (``engine.runner.cache.dtype``); float32 keeps the model's dtype."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_context: int = 2048,
                 prefill_tokens: int = 512, prefill_tokens_decoding: int = 128, eos_token_ids: list[int] | None = None,
                 cpu_linear: str = "auto", idle_shrink_seconds: float = 5.0, prefix_cache_tokens: int = 0,
                 runner: ModelRunner | None = None, linear_dtype: str = "float32", kv_cache_dtype: str = "auto"):
        linear_kernels.check_request(cpu_linear)
        bf16_linear.check_request(linear_dtype)
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")
        self.kv_cache_dtype_request = kv_cache_dtype
        # "bfloat16" / "auto": products in bfloat16 with batch-invariant attention (bf16_linear.py)
        self.linear_dtype_request = linear_dtype
        self.linear_dtype = "float32"
        self.int8_weights = False  # the bfloat16 products' weights in int8 (cpu_linear="int8" on AMX)
        # Measuring and packing happen on the engine's own thread when it starts (_prepare_model says why).
        self.cpu_linear_request = cpu_linear
        self.cpu_linear: str | None = None
        self.linear_timings = None
        self.packed_linears = 0
        self.fused_projections = 0
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_context = max_context
        # A prefill pass stalls every decoding row: with rows decoding it takes fewer prompt tokens
        # (128 halved inter-token p99 at 32 clients on 2 CPU cores against 512, for about the same tok/s).
        # Positions of finished sequences kept for prompts that start with them (0: off; prefix_cache.py).
        self.scheduler = Scheduler(max_batch, prefill_tokens, prefill_tokens_decoding, prefix_cache_tokens)
        # ``runner`` stands in for the model's (tests drive the real step with a fake one, test_scheduler.py).
        self.runner = runner if runner is not None else ModelRunner(model, max_batch)
        eos = eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tokenizer)
        self.output = OutputProcessor(tokenizer, set(eos), max_context)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # The cache gives memory back after this long with nothing to do (not at every gap between requests,
        # which would reallocate it for the next one).
        self.idle_shrink_seconds = idle_shrink_seconds
        self.steps = 0

    # -- public, thread-safe --------------------------------------------------------
    @property
    def info(self) -> dict[str, str]:
        """How the model is served, for /metrics: device, dtype, the linear kernel, whether compiled kernels serve
        and what the KV cache holds."""
        param = next(self.runner.model.parameters(), None)
        dtype = str(param.dtype).removeprefix("torch.") if param is not None else "unknown"
        kv_cache = str(self.runner.cache.dtype).removeprefix("torch.") if self.runner.cache.dtype else dtype
        if self.linear_dtype == "bfloat16":  # float32 model, bfloat16 products (bf16_linear.py), of int8 weights
            dtype += "/int8-weight-linear" if self.int8_weights else "/bfloat16-linear"
        device = self.runner.device.type
        # Whether the compiled kernels (native.py) serve the bfloat16 mode, or PyTorch's operators do
        # (no compiler where the server runs, the build failed, or float32, which never uses them).
        kernels = "compiled" if self.linear_dtype == "bfloat16" and native_kernels.load() is None else "pytorch"
        return {"device": device, "dtype": dtype, "cpu_linear": self.cpu_linear if device == "cpu" else "n/a",
                "kernels": kernels, "kv_cache": kv_cache}

    def start(self) -> None:
        """Start the engine thread; returns once it has chosen and prepared its linear kernels."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatstream-engine", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[object], None]) -> Sequence:
        """Queue a request; ``on_event`` gets Delta..., then one Finished or Failed, on the engine thread.

        Raises ValueError for parameters or prompts the engine cannot serve (nothing is queued then).
        """
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
    def prefix_cache_stats(self) -> dict | None:
        """Prefix cache accounting (a snapshot; None when the cache is off): prompt tokens looked up, tokens
        served from the cache, the hit rate, entries and positions held, and the bytes they take."""
        index = self.scheduler.prefixes
        if index is None:
            return None
        return {"prompt_tokens": index.prompt_tokens, "cached_tokens": index.hit_tokens,
                "hit_rate": index.hit_tokens / index.prompt_tokens if index.prompt_tokens else 0.0,
                "entries": len(index.entries), "held_tokens": index.held_tokens,
                "budget_tokens": index.budget_tokens, "held_bytes": self.runner.kept_bytes}

    # -- the loop ---------------------------------------------------------------------
    def _prepare_model(self) -> None:
        """Choose the CPU linear kernel and prepare the model for it (cpu_linear.prepare_linears), on this thread.

        On this thread because it is the one that runs the model: on the 2-core AMD EPYC here, a
        model packed by the main thread (``ChatStream(...)`` at import time, as the library is
        used) and run by another decoded at one row in 64-101 ms a step, packed and run by the
        same thread in 42-43 ms (best of 60 steps, three runs each).
        """
        request, linear_dtype = self.cpu_linear_request, self.linear_dtype_request
        if request in ("bfloat16", "int8"):  # --cpu-linear bfloat16 / int8: checked on this CPU at start
            linear_dtype = "auto" if linear_dtype == "float32" else linear_dtype
        native = getattr(self.runner, "_native", None)
        if linear_dtype != "float32" and (native is None or native() is None):
            # transformers' own pass has no batch-invariant attention
            log.warning("linear layers serve in float32, not bfloat16 (linear_dtype=%s): the engine's own Llama "
                        "pass does not serve this model", linear_dtype)
            linear_dtype = "float32"
        choice = linear_kernels.prepare_linears(self.runner.model, request, linear_dtype)
        self.cpu_linear, self.linear_timings = choice.kernel, choice.timings
        self.packed_linears, self.fused_projections = choice.packed, choice.fused
        self.linear_dtype, self.int8_weights = choice.linear_dtype, choice.int8_weights
        kv = self.kv_cache_dtype_request
        if self.linear_dtype == "bfloat16":  # auto: the int8 mode keeps keys and values in int8 too
            int8 = kv == "int8" or (kv == "auto" and self.int8_weights)
            self.runner.serve_invariant(torch.int8 if int8 else torch.bfloat16)
        elif kv != "auto":
            log.warning("the KV cache holds the model's dtype, not %s: kv_cache_dtype applies to the bfloat16 and "
                        "int8 modes (--cpu-linear bfloat16 / int8)", kv)

    def _run(self) -> None:
        try:
            self._prepare_model()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._start_error = exc
            return
        finally:
            self._ready.set()
        idle_since = None
        with torch.inference_mode():
            while not self._stopping:
                if self.step():
                    idle_since = None
                    continue
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= self.idle_shrink_seconds:
                    self.runner.shrink()
                self._wake.wait(min(0.5, self.idle_shrink_seconds))
                self._wake.clear()

    def step(self) -> bool:
        """One turn of the engine thread: take new requests, end cancelled ones, run a step; False when there
        was nothing to run. The engine thread calls it; call it only on an engine that was never started."""
        self._drain_inbox()
        self._reap_cancelled()
        if not self.scheduler.has_work():
            return False
        try:
            self._step()
            self.steps += 1
        except Exception as exc:  # a fault of the engine itself: fail what runs, keep serving
            log.exception("generation step failed")
            for seq in self.scheduler.clear():
                self._deliver(seq, [Failed(exc)])
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                self.scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _reap_cancelled(self) -> None:
        for seq in self.scheduler.sequences():
            if seq.cancelled:
                self._finish(seq, "cancelled")

    def _step(self) -> None:
        """Plan, run, update: prompt chunks and decoding rows share one pass (the weights are read once a step)."""
        plan = self.scheduler.schedule(self._prepare)
        for seq, exc in plan.refused:
            self._failed(seq, exc, "admitting a sequence failed")
        if plan.empty:
            return
        try:
            picks = self.runner.execute(plan)
        except Exception as exc:
            for seq in plan.running:
                self._fail(seq, exc, "a forward pass failed")
            return
        self._apply(self.scheduler.update(plan))  # every row's new positions are in the cache before any row moves
        for seq, pick in zip(plan.sampled, picks):
            self._take(seq, pick)

    def _prepare(self, seq: Sequence) -> None:
        """Per-sequence state on admission (Scheduler.schedule calls it); raising here fails this sequence only."""
        # Reserve the sequence's whole extent now: the cache never grows mid-stream.
        self.runner.reserve(min(len(seq.prompt_ids) + seq.params.max_new_tokens, self.max_context))
        if seq.prefix_key is not None:
            self.runner.load(seq.row, seq.prefix_key, seq.cached_tokens)
        seq.generator = self.runner.new_generator(seq.params.seed)
        self.output.start(seq)

    def _apply(self, moves: list) -> None:
        if moves:
            self.runner.apply(moves)

    def _take(self, seq: Sequence, pick: int | Exception) -> None:
        """A sampling result for ``seq``: emit its text, finish it, or fail it."""
        if isinstance(pick, Exception):
            self._fail(seq, pick, "sampling failed")
            return
        try:
            deltas, reason = self.output.accept(seq, pick)
        except Exception as exc:
            self._fail(seq, exc, "output processing failed")
            return
        if self._deliver(seq, deltas) and reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.state is State.DONE:
            return
        self._apply(self.scheduler.remove(seq, keep=True))  # the row is free before the consumer hears of the end
        try:
            events = self.output.finish(seq, reason)
        except Exception as exc:
            log.exception("finishing a sequence failed")
            events = [Failed(exc)]
        self._deliver(seq, events)

    def _fail(self, seq: Sequence, exc: Exception, what: str) -> None:
        if seq.state is State.DONE:
            return
        self._apply(self.scheduler.remove(seq))
        self._failed(seq, exc, what)

    def _failed(self, seq: Sequence, exc: Exception, what: str) -> None:
        """Tell the consumer of a sequence that is already out of the scheduler that it failed."""
        log.error("%s: %s", what, exc, exc_info=exc)
        self._deliver(seq, [Failed(exc)])

    def _deliver(self, seq: Sequence, events: list[object]) -> bool:
        """Call the consumer with ``events``; False if its callback raised (the sequence is then failed)."""
        for event in events:
            try:
                seq.on_event(event)
            except Exception as exc:
                if isinstance(event, (Finished, Failed)):  # the consumer has had its end; nothing more to send
                    log.exception("a consumer's callback raised on the final event")
                    return False
                log.exception("a consumer's callback raised; failing its sequence")
                self._apply(self.scheduler.remove(seq))
                try:
                    seq.on_event(Failed(exc))
                except Exception:
                    log.exception("a consumer's callback raised on the final event")
                return False
        return True


def default_eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return sorted(ids)
