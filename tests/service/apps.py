"""Test apps written exactly as README.md tells application developers to write them, and the
helpers the service tests share (fixtures: tests/service/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from support import net

from chatstream import ChatStream
from chatstream.sessions import SessionMiddleware


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

    def outcomes(self, count: int) -> list[str]:
        """The messages of the first ``count`` calls (fewer if they do not come within a minute)."""
        return [message for _, message, _ in self.wait_for(count)]


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

    def record(request, message):
        log.record(request, message)

    async def record_async(request, message):
        log.record(request, message)

    def record_and_raise(request, message):
        log.record(request, message)
        raise RuntimeError("callback exploded")

    def stream_api_with(callback_func):
        async def stream_api_callback(request: Request):
            return await chat_stream.handle_chat_stream_request(request, callback=callback_func)
        return stream_api_callback

    app.post("/chat_stream_callback")(stream_api_with(record))
    app.post("/chat_stream_async_callback")(stream_api_with(record_async))
    app.post("/chat_stream_raising_callback")(stream_api_with(record_and_raise))

    chat_stream.append_apis(app)
    return app, chat_stream, log


def notes_app(**middleware) -> FastAPI:
    """The session middleware alone (options: ``middleware``) around a note a request may store, and
    routes that store one and then reserve the session or stream."""
    app = FastAPI()
    app.add_middleware(SessionMiddleware, secret_key="test-secret", **middleware)

    @app.post("/note")
    async def note(request: Request):
        request.state.session.get_session()["note"] = (await request.json())["note"]
        return {"ok": True}

    @app.get("/note")
    async def read(request: Request):
        return {"note": request.state.session.get_session().get("note")}

    @app.post("/reserved_note")
    async def reserved_note(request: Request):
        request.state.session.get_session()["note"] = "reserved"
        await request.state.session.reserve()  # a SessionCapacityError here becomes the 503
        return {"ok": True}

    @app.post("/streamed_note")
    async def streamed_note(request: Request):
        request.state.session.get_session()["note"] = "streamed"
        return ticking(3, 0.01, "tick ")

    return app


def ticking(count: int, every: float, label: str = "") -> StreamingResponse:
    """A plain-text stream of ``count`` lines (label 0, label 1, ...), one every ``every`` seconds."""
    async def lines():
        for i in range(count):
            yield f"{label}{i}\n"
            await asyncio.sleep(every)
    return StreamingResponse(lines(), media_type="text/plain")


LONG = "Write a very long story about a dragon who learns to bake bread."


def streaming(srv, text: str = LONG, path: str = "/chat_stream_callback") -> socket.socket:
    """A raw request whose answer has begun (its 200 head read): it holds a slot until its socket is closed."""
    sock = send_raw(srv, text, path)
    assert b"200 OK" in sock.recv(4096)
    return sock


def send_raw(srv, text: str, path: str = "/chat_stream_callback") -> socket.socket:
    """A raw request sent and not read: it is admitted or waits in the queue until its socket is closed."""
    return net.raw_request(srv.port, path, json.dumps({"user_input": text}).encode())


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
