"""The library's facade, without HTTP: ``ChatStreamCore``.

The public class is ``chatstream.ChatStream`` (server/library.py), this core
plus the original library's HTTP methods (``handle_chat_stream_request``,
``append_middlewares``, ``append_apis``), so that this module never imports
the server. A request goes one way: the core validates it and builds the
prompt (conversation.py), the engine client streams it (engine_client.py),
the lifecycle decides its outcome (lifecycle.py), and the core hands the
summary to the observers: the session, metrics, tracing, the user's callback.
docs/architecture.md says what changed from the original and why.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import anyio

from .admission import Admission
from .conversation import Turn, Turns
from .engine.loop import Engine
from .engine.sampling import SamplingParams
from .engine_client import EngineClient
from .errors import ChatStreamError, Rejected, bad_request
from .lifecycle import DISCONNECTED_BEFORE_STREAMING, Stream, Summary
from .metrics import Metrics
from .prompt import ChatPrompt
from .render import encode_text
from .settings import library_default as _default
from .telemetry import Telemetry
from .timeline import Timeline
from . import threads

# The original library's names for the sampling parameters, as clients send them to /set_generation_params and
# as a session keeps them; below this facade they go by SamplingParams' names.
ORIGINAL_NAMES = {"temperature": "temperature", "top_k_value": "top_k", "top_p_value": "top_p"}


def from_original(generation_params: dict | None) -> dict:
    """A session's generation_params under SamplingParams' names."""
    return {ORIGINAL_NAMES[k]: v for k, v in (generation_params or {}).items() if k in ORIGINAL_NAMES}


class ChatStreamCore:
    def __init__(self, name: str = "node:0", model=None, tokenizer=None, device=None,
                 num_of_concurrent_executions: int = _default("num_of_concurrent_executions"),
                 max_queue_size: int = _default("max_queue_size"),
                 max_new_tokens: int = _default("max_new_tokens"), context_len: int = _default("context_len"),
                 temperature: float = _default("temperature"), top_k: int | None = None,
                 top_p: float = _default("top_p"), repetition_penalty: float = 1.0,
                 chat_prompt_clazz=None, too_many_request_as_http_error: bool = False,
                 seed: int | None = None, logger: logging.Logger | None = None, model_name: str | None = None,
                 retry_after_seconds: int = 1, telemetry: Telemetry | None = None,
                 cpu_linear: str = _default("cpu_linear"), kv_cache_dtype: str = _default("kv_cache_dtype"),
                 prefix_cache_tokens: int = _default("prefix_cache_tokens"),
                 window_keep: float = _default("window_keep"), **_ignored_original_options):
        if model is None or tokenizer is None:
            raise ValueError("ChatStream needs a model and a tokenizer (see chatstream.load_model)")
        if device is not None:
            model = model.to(device)
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.logger = logger or logging.getLogger("chatstream")
        self.model_name = model_name or getattr(model, "served_name", None) or getattr(
            model.config, "_name_or_path", "model")
        self.chat_prompt_clazz = chat_prompt_clazz or ChatPrompt
        self.defaults = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                         "repetition_penalty": repetition_penalty, "seed": seed}
        self.max_new_tokens = max_new_tokens
        self.context_len = context_len
        self.admission = Admission(num_of_concurrent_executions, max_queue_size)
        self.engine = Engine(model, tokenizer, max_batch=num_of_concurrent_executions, max_context=context_len,
                             cpu_linear=cpu_linear, prefix_cache_tokens=prefix_cache_tokens,
                             kv_cache_dtype=kv_cache_dtype)
        self.engine.start()  # chooses and packs its linear kernels on its own thread, then serves
        # 503 with Retry-After by default (the original answered 200); 429 when asked for.
        self.client = EngineClient(self.engine, self.admission, 429 if too_many_request_as_http_error else 503,
                                   retry_after_seconds)
        if not 0.0 <= window_keep <= 1.0:
            raise ValueError(f"window_keep must be from 0 to 1, not {window_keep!r}")
        self.turns = Turns(tokenizer, self.new_chat_prompt, self.prompt_budget(), window_keep)
        self.telemetry = telemetry or Telemetry()
        self.telemetry.model_name = self.model_name
        self.metrics = Metrics(self.admission, self.telemetry.meter, self.model_name,
                               lambda: self.engine.prefix_cache_stats, {**self.engine.info, **threads.info()})
        self._callbacks: set[asyncio.Task] = set()

    # -- original companions ------------------------------------------------------------
    async def start_queue_worker(self):
        """Accepted for compatibility: the engine starts with the ChatStream."""
        self.engine.start()

    def shutdown(self):
        self.engine.stop()
        self.telemetry.shutdown()

    def stop_admitting(self) -> None:
        """From now on new requests get 503 (draining); streams in flight run to their end."""
        self.client.draining = True

    @property
    def admitting(self) -> bool:
        return not self.client.draining

    # -- the main entry point --------------------------------------------------------------
    async def chat_turn(self, data, session_mgr=None, request=None, callback=None) -> tuple[Stream, dict]:
        """The stream answering one ``/chat_stream`` body in ``session_mgr``'s session, and the response
        headers; a refusal raises ``ChatStreamError`` (the server answers it)."""
        user_input, regenerate = parse_chat_body(data)
        session = session_mgr.get_session() if session_mgr is not None else {}
        if hasattr(session_mgr, "reserve"):  # a new session gets its place in the store before the stream
            await session_mgr.reserve()
        turn = await self.turns.begin(session_mgr, user_input, regenerate)
        try:
            params = self.sampling_params(from_original(session.get("generation_params")), stop=turn.stop)
        except ChatStreamError:
            turn.undo()
            turn.release()
            raise

        def on_end(summary: Summary) -> None:
            turn.settle(summary)
            self.observe(summary, request, callback, turn.window)

        async def on_complete(text: str) -> None:  # before the last message goes out: the turn is stored
            turn.keep(text)
            save = getattr(session_mgr, "save", None)
            if save is not None:
                await save()

        stream = self.open_stream(turn.prompt_ids, params, "/chat_stream", turn.messages, on_end, on_complete)
        if hasattr(session_mgr, "on_close"):  # a response never sent still ends its stream (turn, lock)
            session_mgr.on_close(lambda: stream.end(DISCONNECTED_BEFORE_STREAMING))
        return stream, {"X-ChatStream-Last-Generated-Message-Id": turn.message_id}

    def open_stream(self, prompt_ids: list[int], params: SamplingParams, endpoint: str, messages, on_end,
                    on_complete=None) -> Stream:
        """A stream for the engine client's generator; it starts (and takes a queue place) when it is sent."""
        timeline = Timeline(len(prompt_ids))
        chunks = self.client.generate(prompt_ids, params, timeline)
        return Stream(chunks, timeline, endpoint, params, messages, on_end, on_complete)

    def observe(self, summary: Summary, request=None, callback=None, window=None) -> None:
        """Tell metrics, tracing and the user's callback (off the critical path) how a stream ended
        (``window``: which turns of a session's conversation its prompt held, window.py)."""
        if isinstance(summary.error, Rejected):
            self.metrics.record_rejected(summary.error.reason)
            return
        self.metrics.record(summary, window)
        trace = self.telemetry.record(summary, expect_callback=callback is not None and summary.admitted,
                                      window=window)
        if callback is not None and summary.admitted:
            self._fire_callback(callback, request, summary.outcome, trace)

    # -- pieces ---------------------------------------------------------------------------
    def new_chat_prompt(self):
        prompt = self.chat_prompt_clazz()
        prompt.set_tokenizer(self.tokenizer)
        prompt.build_initial_prompt(prompt)
        return prompt

    def prompt_budget(self) -> int:
        """Prompt tokens a session's conversation may fill: the context less room for an answer (at most half
        the context); its oldest turns are left out beyond it (window.py)."""
        return self.context_len - min(self.max_new_tokens, self.context_len // 2)

    def prompt_limit(self) -> int:
        """Prompt tokens a client-owned history (``/v1``) may have: all but one position of the context (the
        engine's own limit); nothing is left out of it."""
        return self.context_len - 1

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (its control tokens parsed; render.py says when not to)."""
        return encode_text(self.tokenizer, text, control=True)

    def sampling_params(self, overrides: dict | None = None, max_new_tokens: int | None = None,
                        stop=()) -> SamplingParams:
        """The constructor's defaults, overridden by the non-None values given (keys as in ``self.defaults``),
        checked: a bad value is a 400. ``max_new_tokens`` is capped by the server's own."""
        merged = {**self.defaults, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        params = SamplingParams(max_new_tokens=min(max_new_tokens or self.max_new_tokens, self.max_new_tokens),
                                temperature=float(merged["temperature"]), top_k=merged["top_k"],
                                top_p=float(merged["top_p"] or 1.0),
                                repetition_penalty=float(merged["repetition_penalty"] or 1.0), seed=merged["seed"],
                                stop=list(stop or []))
        try:
            params.validate()
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return params

    def _fire_callback(self, callback, request, message: str, trace) -> None:
        """Run the user's callback off the critical path: sync ones in a thread, async ones as a task."""

        async def call():
            try:
                with trace.callback(message):
                    if inspect.iscoroutinefunction(callback):
                        await callback(request, message)
                    else:
                        result = await anyio.to_thread.run_sync(callback, request, message)
                        if inspect.isawaitable(result):
                            await result
            except Exception:
                self.logger.exception("the completion callback raised (message=%s)", message)

        task = asyncio.get_running_loop().create_task(call())
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    # -- load ------------------------------------------------------------------------------
    def get_load(self) -> dict:
        return {"name": self.name, "processing": self.admission.processing, "waiting": self.admission.waiting}

    @property
    def in_flight(self) -> int:
        """Streams running or queued, and completion callbacks not yet done (a drain waits for all)."""
        return self.admission.processing + self.admission.waiting + len(self._callbacks)


def parse_chat_body(data) -> tuple[str | None, bool]:
    if not isinstance(data, dict):
        raise bad_request('request body must be a JSON object like {"user_input": "...", "regenerate": false}')
    regenerate = data.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise bad_request("'regenerate' must be true or false", "regenerate")
    if regenerate:
        return None, True
    user_input = data.get("user_input")
    if user_input is None:
        raise bad_request("'user_input' is required", "user_input")
    if not isinstance(user_input, str):
        raise bad_request("'user_input' must be a string", "user_input")
    if not user_input.strip():
        raise bad_request("'user_input' must not be empty", "user_input")
    return user_input, False


__all__ = ["ChatStreamCore", "Turn", "parse_chat_body"]
