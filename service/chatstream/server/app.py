"""The ChatStream server: the library's endpoints, the OpenAI API, probes, metrics and the chat page.

With API keys configured (auth.py), every request but the probes, /metrics and
the pages needs ``Authorization: Bearer <key>``; the check runs before the
session middleware, so a refused request never touches the session store.

The model loads on a background thread after the server starts, so that the
liveness probe answers during a long load; ``/readyz`` turns true once it is
loaded and false again while draining.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

from ..errors import ChatStreamError
from ..settings import Settings
from .companion_api import add_companion_routes
from .openai_api import build_router
from .responses import install as install_error_handlers
from .traces_api import build_router as build_traces_router

log = logging.getLogger("chatstream.server")
STATIC = Path(__file__).parent / "static"


class ServerState:
    def __init__(self):
        self.chat_stream = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.on_load_failed = None  # the runner stops the process (runner.py says why)
        self.leaving = False  # SIGTERM came: not ready, though still admitting for a moment (runner.py)

    def require(self):
        if self.chat_stream is None:
            detail = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise ChatStreamError(503, detail, "unavailable", headers={"Retry-After": "5"})
        return self.chat_stream


def build_chat_stream(settings: Settings, telemetry=None):
    from ..loader import load_model
    from .library import ChatStream
    model, tokenizer = load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                  revision=settings.revision)
    return ChatStream(model=model, tokenizer=tokenizer, num_of_concurrent_executions=settings.max_concurrent,
                      max_queue_size=settings.max_queue, max_new_tokens=settings.max_new_tokens,
                      context_len=settings.context_length, temperature=settings.temperature, top_p=settings.top_p,
                      too_many_request_as_http_error=settings.queue_full_status == 429,
                      prefix_cache_tokens=settings.prefix_cache_tokens, window_keep=settings.window_keep,
                      model_name=settings.served_model_name, telemetry=telemetry, cpu_linear=settings.cpu_linear,
                      kv_cache_dtype=settings.kv_cache_dtype)


def session_store(settings: Settings):
    if settings.session_store == "redis":
        from ..redis_store import RedisStore
        return RedisStore(settings.redis_url)
    return None


def create_app(settings: Settings | None = None, chat_stream=None) -> FastAPI:
    """An app serving ``chat_stream``, or one that loads the model named in ``settings``.
    Raises ``auth.ApiKeysError`` when ``settings.api_keys_file`` cannot be used."""
    settings = settings or Settings()
    from ..auth import ApiKeyMiddleware, ApiKeys
    keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
    state = ServerState()
    from ..telemetry import Telemetry
    telemetry = chat_stream.telemetry if chat_stream is not None else Telemetry()

    def load():
        try:
            state.chat_stream = build_chat_stream(settings, telemetry)
            log.info("model %s loaded; serving", settings.model)
        except BaseException as exc:  # noqa: BLE001 - reported on /healthz and /readyz, then the process stops
            state.load_error = str(exc) or type(exc).__name__
            log.error("model load failed: %s", exc)
            if state.on_load_failed is not None:
                state.on_load_failed(state.load_error)
        finally:
            state.loaded.set()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if chat_stream is not None:
            state.chat_stream = chat_stream
            state.loaded.set()
        else:
            threading.Thread(target=load, name="chatstream-model-load", daemon=True).start()
        yield
        if state.chat_stream is not None and chat_stream is None:
            state.chat_stream.shutdown()  # stops the engine and flushes traces and metrics
        else:
            telemetry.provider.force_flush()

    # No /docs, /redoc or /openapi.json: they load scripts from a CDN and document nothing a client needs.
    app = FastAPI(title="ChatStream", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    from ..sessions import SessionMiddleware
    app.add_middleware(SessionMiddleware, secret_key=settings.session_secret, store=session_store(settings))
    if keys is not None:  # added last, so it runs first
        app.add_middleware(ApiKeyMiddleware, keys=keys)

    install_error_handlers(app)

    add_companion_routes(app, state.require)
    app.include_router(build_router(state.require))
    if settings.traces_api == "on":
        app.include_router(build_traces_router(state.require))
    telemetry.instrument(app)

    @app.get("/healthz")
    async def healthz():
        if state.load_error:  # alive, but never going to serve: let the kubelet restart it
            return JSONResponse({"status": "failed", "reason": f"model failed to load: {state.load_error}"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        cs = state.chat_stream
        if cs is None:
            return JSONResponse({"ready": False, "reason": state.load_error or "loading"}, status_code=503)
        if state.leaving or not cs.admitting:
            return JSONResponse({"ready": False, "reason": "draining"}, status_code=503)
        return {"ready": True, "model": cs.model_name}

    @app.get("/metrics")
    async def metrics():
        cs = state.chat_stream
        body = cs.metrics.render() if cs is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/auth.js")
    async def auth_script():  # the pages' key prompt (static/auth.js)
        return FileResponse(STATIC / "auth.js", media_type="text/javascript")

    return app
