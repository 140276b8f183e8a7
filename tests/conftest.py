"""Shared fixtures: the real default model, loaded once, and real HTTP servers around it."""

from __future__ import annotations

import pytest
from support.net import LiveServer


@pytest.fixture(scope="session")
def model_and_tokenizer():
    from chatstream import load_model
    return load_model("builtin:smollm2-135m-instruct", device="cpu")


@pytest.fixture
def live_server():
    servers = []

    def start(app):
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
