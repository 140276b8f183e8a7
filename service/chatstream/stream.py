"""ChatStream: admission, queue, stream lifecycle, sessions and callbacks.

The public surface is the original library's: ``ChatStream(...)``,
``handle_chat_stream_request(request, request_body=None, callback=None)``,
``append_middlewares``, ``append_apis``, ``start_queue_worker``. What changed
underneath, and why, is in docs/architecture.md: the model runs on its own
thread in a batching engine, a full queue is an HTTP error, and the callback
never runs on the event loop's critical path.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .admission import Admission
from .engine.loop import Engine
from .engine.sampling import SamplingParams
from .metrics import Metrics
from .prompt import ChatPrompt
from .telemetry import Telemetry
from .run import (DISCONNECTED_WHILE_STREAMING, SUCCESS, Formatter, RunResponse, StreamRun)

MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
    """A client mistake: becomes a 4xx JSON response."""

    def __init__(self, status: int, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"type": self.code, "message": str(self)}}, status_code=self.status)


class ChatStream:
    def __init__(self, name: str = "node:0", model=None, tokenizer=None, device=None,
                 num_of_concurrent_executions: int = 2, max_queue_size: int = 5,
                 max_new_tokens: int = 256, context_len: int = 1024, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 chat_prompt_clazz=None, too_many_request_as_http_error: bool = False,
                 seed: int | None = None, logger: logging.Logger | None = None, model_name: str | None = None,
                 retry_after_seconds: int = 1, telemetry: Telemetry | None = None, cpu_linear: str = "onednn",
                 **_ignored_original_options):
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
        self.params = {"temperature": temperature, "top_k_value": top_k, "top_p_value": top_p,
                       "repetition_penalty": repetition_penalty, "max_new_tokens": max_new_tokens,
                       "context_len": context_len, "seed": seed}
        self.max_new_tokens = max_new_tokens
        self.context_len = context_len
        # 503 with Retry-After by default (the original answered 200); 429 when asked for.
        self.queue_full_status = 429 if too_many_request_as_http_error else 503
        self.retry_after_seconds = retry_after_seconds
        self.admission = Admission(num_of_concurrent_executions, max_queue_size)
        self.engine = Engine(model, tokenizer, max_batch=num_of_concurrent_executions, max_context=context_len,
                             cpu_linear=cpu_linear)
        self.telemetry = telemetry or Telemetry()
        self.metrics = Metrics(self.admission, self.telemetry.meter, self.model_name)
        self.draining = False
        self._tasks: set[asyncio.Task] = set()
        self.engine.start()

    # -- original companions ------------------------------------------------------------
    async def start_queue_worker(self):
        """Accepted for compatibility: the engine starts with the ChatStream."""
        self.engine.start()

    def append_middlewares(self, app, opts: dict | None = None):
        from .sessions import SessionMiddleware
        opts = opts or {}
        session_opts = opts.get("session", opts.get("fast_session", {})) or {}
        app.add_middleware(SessionMiddleware, secret_key=session_opts.get("secret_key"),
                           store=session_opts.get("store"), https_only=session_opts.get("https_only", False))
        self.telemetry.instrument(app)

    def append_apis(self, app, opts: dict | None = None):
        from .server.companion_api import add_companion_routes
        from .server.traces_api import build_router
        add_companion_routes(app, lambda: self)
        app.include_router(build_router(lambda: self))

    def shutdown(self):
        self.engine.stop()
        self.telemetry.provider.force_flush()

    # -- the main entry point --------------------------------------------------------------
    async def handle_chat_stream_request(self, request: Request, request_body=None, callback=None):
        try:
            data = await self._read_body(request, request_body)
            user_input, regenerate = self._parse_chat_body(data)
            session_mgr = getattr(request.state, "session", None)
            chat_prompt = self._session_prompt(session_mgr)
            undo = self._apply_turn(chat_prompt, user_input, regenerate)
            try:
                prompt_ids = self._prompt_ids(chat_prompt)
            except RequestError:
                undo()
                raise
        except RequestError as err:
            return err.response()
        session = session_mgr.get_session() if session_mgr else {}
        params = self.sampling_params(session.get("generation_params"), stop=chat_prompt.get_stop_strs())
        message_id = str(uuid.uuid4())
        chat_prompt.set_responder_last_msg_id(message_id)

        def on_end(run: StreamRun):
            if run.outcome in (SUCCESS, DISCONNECTED_WHILE_STREAMING):
                chat_prompt.set_responder_last_msg(run.full_text)
            else:
                undo()
            if session_mgr is not None:
                session_mgr.save_session()
            self.metrics.record_run(run)
            if callback is not None:
                self._fire_callback(callback, request, run)

        messages = chat_prompt.messages() if hasattr(chat_prompt, "messages") else None
        run = self.start_run(prompt_ids, params, on_end, "/chat_stream", messages, has_callback=callback is not None)
        if isinstance(run, Response):
            undo()
            return run
        return RunResponse(run, Formatter(), {"X-ChatStream-Last-Generated-Message-Id": message_id})

    def start_run(self, prompt_ids: list[int], params: SamplingParams, on_end, endpoint: str = "",
                  messages=None, has_callback: bool = False) -> StreamRun | Response:
        """Reserve a queue place for a generation, or an error response when none can be had."""
        if self.draining:
            self.metrics.record_rejected("draining")
            return JSONResponse({"error": {"type": "unavailable", "message": "the server is shutting down"}},
                                status_code=503, headers={"Retry-After": str(self.retry_after_seconds)})
        ticket = self.admission.reserve()
        if ticket is None:
            self.metrics.record_rejected("queue_full")
            return JSONResponse(
                {"error": {"type": "too_many_requests",
                           "message": f"all {self.admission.slots} slots are busy and the queue of "
                                      f"{self.admission.max_queue} is full; retry later"}},
                status_code=self.queue_full_status, headers={"Retry-After": str(self.retry_after_seconds)})
        run_trace = self.telemetry.start_run(self.model_name, endpoint, params, len(prompt_ids), messages)
        return StreamRun(self, ticket, prompt_ids, params, on_end, run_trace, has_callback)

    # -- pieces ---------------------------------------------------------------------------
    async def _read_body(self, request: Request, request_body) -> object:
        if request_body is None:
            size = int(request.headers.get("content-length") or 0)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"request body is {size} bytes; the limit is {MAX_BODY_BYTES}", "too_large")
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > MAX_BODY_BYTES:
                    raise RequestError(413, f"request body exceeds {MAX_BODY_BYTES} bytes", "too_large")
                chunks.append(chunk)
            request_body = b"".join(chunks)
            request._body = request_body  # later request.body()/json() calls still work
        if isinstance(request_body, (dict, list)):
            return request_body
        if isinstance(request_body, str):
            request_body = request_body.encode("utf-8")
        if len(request_body) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body exceeds {MAX_BODY_BYTES} bytes", "too_large")
        try:
            return json.loads(request_body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc}") from None

    @staticmethod
    def _parse_chat_body(data) -> tuple[str | None, bool]:
        if not isinstance(data, dict):
            raise RequestError(400, 'request body must be a JSON object like {"user_input": "...", "regenerate": false}')
        regenerate = data.get("regenerate", False)
        if not isinstance(regenerate, bool):
            raise RequestError(400, "'regenerate' must be true or false")
        user_input = data.get("user_input")
        if regenerate:
            return None, True
        if user_input is None:
            raise RequestError(400, "'user_input' is required")
        if not isinstance(user_input, str):
            raise RequestError(400, "'user_input' must be a string")
        if not user_input.strip():
            raise RequestError(400, "'user_input' must not be empty")
        return user_input, False

    def new_chat_prompt(self):
        prompt = self.chat_prompt_clazz()
        prompt.set_tokenizer(self.tokenizer)
        prompt.build_initial_prompt(prompt)
        return prompt

    def _session_prompt(self, session_mgr):
        if session_mgr is None:
            return self.new_chat_prompt()
        session = session_mgr.get_session()
        prompt = session.get("chat_prompt")
        if prompt is None:
            prompt = self.new_chat_prompt()
            session["chat_prompt"] = prompt
        if getattr(prompt, "tokenizer", None) is None:
            prompt.set_tokenizer(self.tokenizer)
        return prompt

    @staticmethod
    def _apply_turn(chat_prompt, user_input, regenerate):
        """Add the turn to the conversation; return a function that takes it back."""
        if regenerate:
            if chat_prompt.is_empty() or chat_prompt.get_responder_last_msg() is None:
                raise RequestError(400, "nothing to regenerate: the conversation has no answer yet")
            previous = chat_prompt.get_responder_last_msg()
            chat_prompt.clear_last_responder_message()
            return lambda: chat_prompt.set_responder_last_msg(previous)
        chat_prompt.add_requester_msg(user_input)
        chat_prompt.add_responder_msg(None)

        def undo():
            chat_prompt.remove_last_responder_msg()
            chat_prompt.remove_last_requester_msg()
        return undo

    def prompt_budget(self) -> int:
        """Prompt tokens allowed: the context less room for an answer (at most half the context)."""
        return self.context_len - min(self.max_new_tokens, self.context_len // 2)

    def _prompt_ids(self, chat_prompt) -> list[int]:
        """Render and tokenize; drop the oldest whole turns until the prompt fits the context."""
        budget = self.prompt_budget()
        while True:
            ids = self.encode(chat_prompt.create_prompt())
            if len(ids) <= budget:
                return ids
            if not chat_prompt.drop_oldest_turn():
                raise RequestError(400, f"the input is too long: {len(ids)} tokens, the limit is {budget}",
                                   "context_length_exceeded")

    def encode(self, text: str) -> list[int]:
        # Chat templates already contain the special tokens they need.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sampling_params(self, overrides: dict | None = None, max_new_tokens: int | None = None,
                        stop=()) -> SamplingParams:
        """The constructor's defaults, overridden by the non-None values given (the original's key names:
        temperature, top_k_value, top_p_value, repetition_penalty, seed)."""
        merged = {**self.params, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        return SamplingParams(max_new_tokens=max_new_tokens or self.max_new_tokens,
                              temperature=float(merged["temperature"]), top_k=merged["top_k_value"],
                              top_p=float(merged["top_p_value"] or 1.0),
                              repetition_penalty=float(merged["repetition_penalty"] or 1.0), seed=merged["seed"],
                              stop=list(stop or []))

    def _fire_callback(self, callback, request, run: StreamRun) -> None:
        """Run the user's callback off the critical path: sync ones in a thread, async ones as a task."""
        message = run.outcome

        async def call():
            try:
                with run.trace.callback(message):
                    if inspect.iscoroutinefunction(callback):
                        await callback(request, message)
                    else:
                        result = await anyio.to_thread.run_sync(callback, request, message)
                        if inspect.isawaitable(result):
                            await result
            except Exception:
                self.logger.exception("the completion callback raised (message=%s)", message)

        task = asyncio.get_running_loop().create_task(call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- load ------------------------------------------------------------------------------
    def get_load(self) -> dict:
        return {"name": self.name, "processing": self.admission.processing, "waiting": self.admission.waiting}

    @property
    def in_flight(self) -> int:
        return self.admission.processing + self.admission.waiting
