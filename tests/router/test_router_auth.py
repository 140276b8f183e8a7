"""API keys through the real HAProxy: the router passes Authorization on untouched (HAProxy forwards every
request header in `mode http`; the config adds no rule about it), the pod decides, and the router's own
health checks reach the pods' open /readyz."""

from __future__ import annotations

import httpx
import openai
import pytest
from support.net import free_port

from chatstream_operator import router

from .harness import Pod, Router, need_haproxy, running

KEY = "cs-router-5e1f0a9b"


@pytest.fixture(scope="module")
def keyed_proxy(redis_url, tmp_path_factory):
    need_haproxy()
    workdir = tmp_path_factory.mktemp("keyed")
    (workdir / "keys").write_text(KEY + "\n")
    pod = Pod("keyed", "127.0.0.2", free_port(), redis_url, workdir, env={"CHATSTREAM_API_KEYS_FILE": str(workdir / "keys")})
    with running(pod):  # ready: /readyz needs no key
        with Router([pod], workdir) as r:  # waits until haproxy's /readyz checks mark the pod up
            r.pod = pod
            yield r


def test_authorization_passes_through_the_router(keyed_proxy):
    r = httpx.post(keyed_proxy.url + "/chat_stream", json={"user_input": "Hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers[router.SERVED_BY_HEADER] == "keyed", "the pod refused it, not the router"
    wrong = openai.OpenAI(base_url=keyed_proxy.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    client = openai.OpenAI(base_url=keyed_proxy.url + "/v1", api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(model="smollm2-135m-instruct", stream=True, max_tokens=8,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with httpx.Client(base_url=keyed_proxy.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        assert c.post("/chat_stream", json={"user_input": "Hi"}).status_code == 200
        assert c.get("/get_prompt").json()["prompt"], "the session works through the router with the key"
    assert keyed_proxy.servers_up() == {"keyed"}, "haproxy's health checks (GET /readyz, no key) keep the pod up"
    assert KEY not in keyed_proxy.log.read_text(), "haproxy logs no request header"
