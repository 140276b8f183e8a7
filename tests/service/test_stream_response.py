"""StreamResponse is a Starlette response like any other: the caller's headers and background are honoured,
and a response built but never sent still ends its stream (the session's turn lock), with no ``__del__``."""

from __future__ import annotations

import threading

import httpx
from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse

from .apps import make_app


def test_the_callers_headers_and_background_go_with_the_stream(model_and_tokenizer, live_server):
    app, chat_stream, _ = make_app(*model_and_tokenizer)
    ran = threading.Event()
    seen = {}

    @app.post("/decorated")
    async def decorated(request: Request):
        response = await chat_stream.handle_chat_stream_request(request)
        response.headers["X-Extra"] = "yes"
        response.background = BackgroundTask(lambda: (seen.setdefault("prompt", request.state.session.get_session()
                                                                       ["chat_prompt"].create_prompt()), ran.set()))
        return response

    server = live_server(app)
    r = httpx.post(server.url + "/decorated", json={"user_input": "What is the capital of France?"}, timeout=120)
    assert r.status_code == 200 and r.text
    assert r.headers["x-extra"] == "yes"
    assert r.headers["x-chatstream-last-generated-message-id"]
    assert r.headers["content-type"].startswith("text/plain") and "content-length" not in r.headers
    assert ran.wait(10), "the background task never ran"
    assert r.text.strip() in seen["prompt"], "the background runs after the turn was kept"


def test_a_response_built_and_never_sent_ends_its_turn(model_and_tokenizer, live_server):
    app, chat_stream, _ = make_app(*model_and_tokenizer)

    @app.post("/changed_my_mind")
    async def changed_my_mind(request: Request):
        await chat_stream.handle_chat_stream_request(request)
        return PlainTextResponse("not now")

    server = live_server(app)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.post("/changed_my_mind", json={"user_input": "Hi"}).text == "not now"
        r = client.post("/chat_stream", json={"user_input": "What is the capital of France?"})
        assert r.status_code == 200, "the turn of the response never sent still held the session (409)"
        prompt = client.get("/get_prompt").json()["prompt"]
    assert "Hi" not in prompt and "capital of France" in prompt, "the unsent turn was taken back"
    assert chat_stream.admission.processing == 0 and chat_stream.admission.waiting == 0
