"""Fixtures the service tests share."""

from __future__ import annotations

import pytest

from .apps import make_app


@pytest.fixture
def one_slot(model_and_tokenizer, live_server):
    app, chat_stream, log = make_app(*model_and_tokenizer, num_of_concurrent_executions=1, max_queue_size=2,
                                     max_new_tokens=200)
    srv = live_server(app)
    srv.chat_stream, srv.log = chat_stream, log
    return srv
