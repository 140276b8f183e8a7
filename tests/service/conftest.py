"""Fixtures the service tests share."""

from __future__ import annotations

import pytest

from chatstream.server.app import create_app

from .apps import make_app


@pytest.fixture
def serve(model_and_tokenizer, live_server):
    """Starts a live server around a new ChatStream (make_app's options) and returns it with its
    ``chat_stream`` and callback ``log``: the app make_app writes as README.md tells developers to, or,
    given ``settings``, the real server's app (create_app: error handlers, companions, /v1)."""
    def start(settings=None, **options):
        app, chat_stream, log = make_app(*model_and_tokenizer, **options)
        if settings is not None:
            app = create_app(settings, chat_stream=chat_stream)
        srv = live_server(app)
        srv.chat_stream, srv.log = chat_stream, log
        return srv
    return start


@pytest.fixture
def one_slot(serve):
    return serve(num_of_concurrent_executions=1, max_queue_size=2, max_new_tokens=200)
