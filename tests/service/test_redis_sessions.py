"""Sessions shared by two replicas through a real Redis server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx
import pytest
from fastapi import FastAPI, Request

from chatstream import ChatStream
from chatstream.redis_store import RedisStore

REDIS = shutil.which("redis-server")


@pytest.fixture
def redis_url(tmp_path):
    if REDIS is None:
        pytest.fail("redis-server is not installed (scripts/system-deps.sh installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def replica(model, tokenizer, url) -> FastAPI:
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, max_new_tokens=24, temperature=0.0)
    app = FastAPI()
    chat_stream.append_middlewares(app, {"session": {"secret_key": "shared-secret", "store": RedisStore(url)}})

    @app.post("/chat_stream")
    async def stream_api(request: Request):
        return await chat_stream.handle_chat_stream_request(request)

    chat_stream.append_apis(app)
    return app


def test_conversation_moves_between_replicas(model_and_tokenizer, live_server, redis_url):
    a = live_server(replica(*model_and_tokenizer, redis_url))
    b = live_server(replica(*model_and_tokenizer, redis_url))
    with httpx.Client(base_url=a.url, timeout=120) as client:
        assert client.post("/chat_stream", json={"user_input": "My name is Alice. Please remember it."}).status_code == 200
        cookie = client.cookies["chatstream_session"]
    with httpx.Client(base_url=b.url, timeout=120, cookies={"chatstream_session": cookie}) as client:
        answer = client.post("/chat_stream", json={"user_input": "What is my name?"}).text
        prompt = client.get("/get_prompt").json()["prompt"]
    assert "My name is Alice" in prompt and "Alice" in answer
