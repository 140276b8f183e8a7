"""Session store bounds and the configurable queue-full status."""

from __future__ import annotations

import time

import httpx

from chatstream.sessions import MemoryStore

from .apps import make_app


def test_memory_store_is_bounded_in_size_and_age():
    store = MemoryStore(max_sessions=3, max_idle_seconds=0.2)
    for i in range(5):
        store.save(f"s{i}", {"n": i})
    assert len(store) == 3 and store.load("s0") is None and store.load("s4") == {"n": 4}
    store.load("s2")  # touching a session keeps it young
    time.sleep(0.25)
    assert store.load("s2") is None, "idle sessions expire"
    store.save("fresh", {})
    assert len(store) == 1


def test_queue_full_can_answer_429(model_and_tokenizer, live_server):
    app, chat_stream, _ = make_app(*model_and_tokenizer, too_many_request_as_http_error=True)
    srv = live_server(app)
    chat_stream.admission.processing = chat_stream.admission.slots
    chat_stream.admission._queue.extend(object() for _ in range(chat_stream.admission.max_queue))
    try:
        r = httpx.post(srv.url + "/chat_stream", json={"user_input": "hi"}, timeout=30)
    finally:
        chat_stream.admission.processing = 0
        chat_stream.admission._queue.clear()
    assert r.status_code == 429 and r.headers["retry-after"]
