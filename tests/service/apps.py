"""Test apps written exactly as README.md tells application developers to write them, and the
helpers the service tests share (fixtures: tests/service/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import threading

import httpx
from fastapi import FastAPI, Request
from support import net

from chatstream import ChatStream


class CallbackLog:
    """Records every callback call: (path, message, conversation so far)."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []
        self.changed = threading.Condition()

    def record(self, request, message):
        session = request.state.session.get_session()
        prompt = session.get("chat_prompt")
        with self.changed:
            self.calls.append((request.url.path, message, prompt.create_prompt() if prompt else ""))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 60.0) -> list:
        with self.changed:
            self.changed.wait_for(lambda: len(self.calls) >= count, timeout)
            return list(self.calls)


def make_app(model, tokenizer, **options) -> tuple[FastAPI, ChatStream, CallbackLog]:
    options = {"num_of_concurrent_executions": 2, "max_queue_size": 5, "max_new_tokens": 32,
               "context_len": 1024, "temperature": 0.0, **options}
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, device="cpu", **options)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await chat_stream.start_queue_worker()
        yield
        chat_stream.shutdown()

    app = FastAPI(lifespan=lifespan)
    chat_stream.append_middlewares(app, {"session": {"secret_key": "test-secret"}})
    log = CallbackLog()

    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

    @app.post("/chat_stream_intercept")
    async def stream_api_intercept(request: Request):
        body = await request.body()
        data = json.loads(body)  # {"user_input": str, "regenerate": bool}
        assert "user_input" in data
        return await chat_stream.handle_chat_stream_request(request, body)

    @app.post("/chat_stream_callback")
    async def stream_api_callback(request: Request):
        def callback_func(request, message):
            log.record(request, message)
        return await chat_stream.handle_chat_stream_request(request, callback=callback_func)

    @app.post("/chat_stream_async_callback")
    async def stream_api_async_callback(request: Request):
        async def callback_func(request, message):
            log.record(request, message)
        return await chat_stream.handle_chat_stream_request(request, callback=callback_func)

    @app.post("/chat_stream_raising_callback")
    async def stream_api_raising(request: Request):
        def callback_func(request, message):
            log.record(request, message)
            raise RuntimeError("callback exploded")
        return await chat_stream.handle_chat_stream_request(request, callback=callback_func)

    chat_stream.append_apis(app)
    return app, chat_stream, log


def wait_until(predicate, timeout=30.0):
    """support.net.wait_until, polling every 20 ms (the service tests wait on in-process state)."""
    net.wait_until(predicate, timeout, "the condition", interval=0.02)


def is_error_shape(r: httpx.Response) -> bool:
    body = r.json()
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"} and \
        isinstance(body["error"]["message"], str) and body["error"]["message"]


def stream_traces(chat_stream, outcome=None):
    out = []
    for trace in chat_stream.telemetry.store.traces():
        chat = [s for s in trace["spans"] if s["attributes"].get("gen_ai.operation.name") == "chat"]
        if chat and (outcome is None or chat[0]["attributes"].get("chatstream.outcome") == outcome):
            out.append((trace, chat[0]))
    return out


class BrokenModel:
    """Fault injection: a model whose forward pass fails, as on a GPU out of memory.

    No client behaviour can make a healthy server fail, so the failure is planted
    in the model; everything around it (engine, stream, HTTP) is real.
    """

    def __init__(self, model, fail_after_calls: int):
        self.model, self.calls, self.fail_after = model, 0, fail_after_calls
        self.dtype, self.config = model.dtype, model.config

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("CUDA out of memory (injected)")
        return self.model(*args, **kwargs)


@contextlib.contextmanager
def broken_model(chat_stream: ChatStream, fail_after_calls: int):
    """The engine's model failing after `fail_after_calls` forward passes, for the block; the
    healthy one back after it."""
    runner = chat_stream.engine.runner
    healthy = runner.model
    runner.model = BrokenModel(healthy, fail_after_calls)
    try:
        yield
    finally:
        runner.model = healthy
