"""``chatstream.ChatStream``: the original library's class, the core (stream.py) with its HTTP methods.

``handle_chat_stream_request(request, request_body=None, callback=None)``,
``append_middlewares(app, opts)`` and ``append_apis(app, opts)`` speak HTTP, so
they live here, on the server side: the core never imports the server, and
the server's routes import the core, one way.
"""

from __future__ import annotations

from ..errors import ChatStreamError
from .request_body import read_json
from ..stream import ChatStreamCore
from .companion_api import add_companion_routes
from .responses import Formatter, StreamResponse, error_response
from .traces_api import build_router


class ChatStream(ChatStreamCore):
    async def handle_chat_stream_request(self, request, request_body=None, callback=None):
        """Answer a ``/chat_stream`` request: a streamed text response, or the JSON error."""
        session_mgr = getattr(request.state, "session", None)
        try:
            stream, headers = await self.chat_turn(await read_json(request, request_body), session_mgr, request,
                                                   callback)
        except ChatStreamError as err:
            return error_response(err)
        return StreamResponse(stream, Formatter(), headers)

    def append_middlewares(self, app, opts: dict | None = None):
        from ..sessions import SessionMiddleware
        opts = opts or {}
        session_opts = opts.get("session", opts.get("fast_session", {})) or {}
        store = session_opts.get("store")
        if hasattr(store, "allow"):  # a shared store rebuilds only the prompt classes it is told about
            store.allow(self.chat_prompt_clazz)
        app.add_middleware(SessionMiddleware, secret_key=session_opts.get("secret_key"),
                           store=store, https_only=session_opts.get("https_only", False))
        self.telemetry.instrument(app)

    def append_apis(self, app, opts: dict | None = None):
        add_companion_routes(app, lambda: self)
        app.include_router(build_router(lambda: self))
