"""API keys (chatstream.auth) on the real server over real HTTP: one test per access rule."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx
import openai
import pytest
from support.net import LiveServer

from chatstream import envvars
from chatstream.auth import ApiKeyMiddleware, ApiKeys, ApiKeysError
from chatstream.server.app import create_app
from chatstream.settings import Settings

from .apps import is_error_shape, make_app, stream_traces, wait_until

KEY = "cs-test-7f3a9c2e5b1d4f60"
OTHER_KEY = "cs-test-rotated-0c8e2a41"
QUESTION = "What is the capital of France?"
# Everything a key guards (a method and a path each), one unknown path included: closed by default.
GUARDED = [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/chat_stream"),
           ("POST", "/clear_context"), ("GET", "/get_load"), ("GET", "/get_prompt"),
           ("POST", "/set_generation_params"), ("GET", "/get_generation_params"), ("GET", "/api/traces"),
           ("GET", "/no-such-endpoint")]
OPEN = ["/healthz", "/readyz", "/metrics", "/", "/traces", "/auth.js"]


def kubelet_secret_dir(path, keys: list[str], version: int) -> str:
    """A directory laid out as the kubelet mounts a Secret (``keys -> ..data/keys``, ``..data -> ..vN``),
    with ``..data`` swapped atomically to a new version, as the kubelet does when the Secret changes."""
    version_dir = path / f"..v{version}"
    version_dir.mkdir()
    (version_dir / "keys").write_text("".join(k + "\n" for k in keys))
    tmp = path / "..data_tmp"
    os.symlink(version_dir.name, tmp)
    os.replace(tmp, path / "..data")
    if not (path / "keys").is_symlink():
        os.symlink("..data/keys", path / "keys")
    return str(path / "keys")


def keyed_server(model_and_tokenizer, secret_dir):
    key_file = kubelet_secret_dir(secret_dir, ["# the team's keys", KEY, ""], 1)
    _, chat_stream, _ = make_app(*model_and_tokenizer, max_new_tokens=16)
    srv = LiveServer(create_app(Settings(api_keys_file=key_file), chat_stream=chat_stream))
    srv.chat_stream, srv.secret_dir = chat_stream, secret_dir
    return srv


@pytest.fixture(scope="module")
def keyed(model_and_tokenizer, tmp_path_factory):
    with keyed_server(model_and_tokenizer, tmp_path_factory.mktemp("secret")) as srv:
        yield srv


@pytest.fixture
def rotating(model_and_tokenizer, tmp_path):
    """A server of its own: its test changes the keys."""
    with keyed_server(model_and_tokenizer, tmp_path) as srv:
        yield srv


def call(srv, method, path, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
    body = {"/v1/chat/completions": {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4},
            "/chat_stream": {"user_input": QUESTION}, "/set_generation_params": {"temperature": 0.5}}.get(path)
    return httpx.request(method, srv.url + path, headers=headers, json=body if method == "POST" else None,
                         timeout=60, **kw)


def assert_refused(r: httpx.Response, missing: bool) -> None:
    assert r.status_code == 401 and is_error_shape(r), (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert ("needs an API key" in error["message"]) == missing, error["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert "set-cookie" not in r.headers, "a refused request created a session"


@pytest.mark.parametrize("method, path", GUARDED, ids=[p for _, p in GUARDED])
def test_no_key_is_refused(keyed, method, path):
    assert_refused(call(keyed, method, path), missing=True)
    assert_refused(httpx.request(method, keyed.url + path, headers={"Authorization": f"Basic {KEY}"}, timeout=10),
                   missing=True)


@pytest.mark.parametrize("method, path", GUARDED, ids=[p for _, p in GUARDED])
def test_wrong_key_is_refused(keyed, method, path):
    for wrong in ("nope", KEY[:-1], KEY + "x", KEY.upper(), ""):
        assert_refused(call(keyed, method, path, wrong), missing=False)


@pytest.mark.parametrize("method, path", GUARDED[:-1], ids=[p for _, p in GUARDED[:-1]])
def test_right_key_is_served(keyed, method, path):
    r = call(keyed, method, path, KEY)
    assert r.status_code == 200, r.text


def test_openai_client_with_and_without_the_key(keyed):
    def client(key):
        return openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError) as refused:
        client("wrong").models.list()
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    stream = client(KEY).chat.completions.create(model="smollm2-135m-instruct", temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_chat_stream_conversation_with_the_key(keyed):
    with httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        first = c.post("/chat_stream", json={"user_input": QUESTION})
        assert first.status_code == 200 and "Paris" in first.text
        c.post("/chat_stream", json={"user_input": "And of Italy?"}).raise_for_status()
        prompt = c.get("/get_prompt").json()["prompt"]
        assert QUESTION in prompt and "And of Italy?" in prompt, "the session kept both turns"
        # The session cookie alone is not a key.
        stolen = httpx.get(keyed.url + "/get_prompt", cookies=c.cookies, timeout=10)
        assert_refused(stolen, missing=True)


@pytest.mark.parametrize("path", OPEN)
def test_probes_metrics_and_pages_need_no_key(keyed, path):
    r = httpx.get(keyed.url + path, timeout=10)
    assert r.status_code == 200, (path, r.status_code, r.text[:200])


def test_changed_key_file_takes_effect_without_restart(rotating, caplog):
    keyed = rotating
    caplog.set_level(logging.INFO, logger="chatstream.auth")
    assert call(keyed, "GET", "/v1/models", KEY).status_code == 200
    kubelet_secret_dir(keyed.secret_dir, [OTHER_KEY], 2)  # the Secret rotated: the kubelet swaps ..data
    assert_refused(call(keyed, "GET", "/v1/models", KEY), missing=False)
    assert call(keyed, "GET", "/v1/models", OTHER_KEY).status_code == 200
    kubelet_secret_dir(keyed.secret_dir, [KEY, OTHER_KEY], 3)  # two keys during a rotation
    assert all(call(keyed, "GET", "/v1/models", k).status_code == 200 for k in (KEY, OTHER_KEY))
    kubelet_secret_dir(keyed.secret_dir, ["# every key revoked"], 4)  # empty: closed, never open
    for k in (KEY, OTHER_KEY, None):
        assert call(keyed, "GET", "/v1/models", k).status_code == 401
    assert "holds no key" in caplog.text
    kubelet_secret_dir(keyed.secret_dir, [OTHER_KEY], 5)
    assert call(keyed, "GET", "/v1/models", OTHER_KEY).status_code == 200
    os.unlink(keyed.secret_dir / "..data")  # unreadable for a moment: the keys last read stay
    assert call(keyed, "GET", "/v1/models", OTHER_KEY).status_code == 200
    assert call(keyed, "GET", "/v1/models", KEY).status_code == 401


def test_keys_never_reach_logs_or_spans(model_and_tokenizer, live_server, tmp_path, caplog, capfd, monkeypatch):
    # Header capture switched on for every header: the strongest setting an operator could choose.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    caplog.set_level(logging.DEBUG)
    key_file = kubelet_secret_dir(tmp_path, [KEY], 1)
    _, chat_stream, _ = make_app(*model_and_tokenizer, max_new_tokens=8)
    srv = live_server(create_app(Settings(api_keys_file=key_file), chat_stream=chat_stream))
    wrong = KEY[::-1]
    assert call(srv, "POST", "/chat_stream", KEY).status_code == 200
    assert call(srv, "POST", "/v1/chat/completions", KEY).status_code == 200
    assert call(srv, "POST", "/chat_stream", wrong).status_code == 401
    wait_until(lambda: len(stream_traces(chat_stream)) >= 2, 30)
    spans = json.dumps(chat_stream.telemetry.store.traces())
    captured = [s["attributes"].get("http.request.header.authorization") for t in chat_stream.telemetry.store.traces()
                for s in t["spans"] if "http.request.header.authorization" in s["attributes"]]
    assert captured and all(v == ["[REDACTED]"] for v in captured), "header capture was on, and redacted"
    out, err = capfd.readouterr()
    for secret in (KEY, wrong):
        assert secret not in spans
        assert secret not in caplog.text and secret not in out and secret not in err
    assert "API keys required: 1 key(s)" in caplog.text


def test_a_keys_file_that_cannot_be_used_stops_the_server(tmp_path, monkeypatch):
    with pytest.raises(ApiKeysError, match="No such file"):
        ApiKeys(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n# nothing yet\n\n")
    with pytest.raises(ApiKeysError, match="holds no key"):
        ApiKeys(str(tmp_path / "empty"))
    # The real command: exit 2 with the reason where Kubernetes shows it, before any model loads.
    env = {**os.environ, envvars.API_KEYS_FILE: str(tmp_path / "empty"),
           envvars.TERMINATION_LOG: str(tmp_path / "termination-log"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "chatstream", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds no key" in (tmp_path / "termination-log").read_text()


def test_the_library_app_asks_for_keys_only_when_it_opts_in(model_and_tokenizer, live_server, tmp_path):
    """ChatStream inside an application's own FastAPI app: no key asked unless the app adds the middleware."""
    app, _, _ = make_app(*model_and_tokenizer, max_new_tokens=4)
    srv = live_server(app)
    assert httpx.post(srv.url + "/chat_stream", json={"user_input": "Hi"}, timeout=60).status_code == 200
    (tmp_path / "keys").write_text(KEY + "\n")
    guarded, _, _ = make_app(*model_and_tokenizer, max_new_tokens=4)
    guarded.add_middleware(ApiKeyMiddleware, keys=ApiKeys(str(tmp_path / "keys")))
    srv = live_server(guarded)
    assert_refused(httpx.post(srv.url + "/chat_stream", json={"user_input": "Hi"}, timeout=60), missing=True)
    assert call(srv, "POST", "/chat_stream", KEY).status_code == 200
