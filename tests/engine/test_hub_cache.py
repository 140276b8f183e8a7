"""The model cache's fill and the pods' loads, through the real huggingface_hub
and transformers, against a hub stand-in on loopback (tests/support/hub_mirror.py:
the hub cannot be reached here). The same mirror serves the node test
(tests/node/test_node_model_cache.py), so these tests also hold its protocol
against the installed huggingface_hub.

Every step runs as its own process, as in a pod: huggingface_hub reads
HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatstream.loader import prepare_builtin
from chatstream_operator import model_cache

ROOT = Path(__file__).resolve().parents[2]
MIRROR = ROOT / "tests/support/hub_mirror.py"
REPO = "chatstream-tests/smollm2"
TOKEN = "hf_chatstream_test_token"

ANSWER = """
import sys
import torch
from chatstream.loader import load_model
model, tok = load_model(sys.argv[1], device="cpu")
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, tokenize=True, return_dict=True,
                              return_tensors="pt")["input_ids"]
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
print("ANSWER", tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""


class Mirror:
    def __init__(self, model_dir: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(MIRROR), "--repo", f"{REPO}={model_dir}", "--host", "127.0.0.1", "--port", "0",
             "--token", TOKEN],
            stdout=subprocess.PIPE, text=True)
        self.requests: list[str] = []
        self.commit = None
        for line in self.proc.stdout:
            if "commit" in line:
                self.commit = line.rsplit(" ", 1)[1].strip()
            if line.startswith("LISTENING"):
                self.url = f"http://127.0.0.1:{line.split()[1]}"
                break
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("REQUEST"):
                self.requests.append(line.split(maxsplit=2)[2].strip())  # "GET /path 200"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def model_dir():
    return prepare_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def mirror(model_dir):
    m = Mirror(model_dir)
    yield m
    m.stop()


def run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(env)
    return subprocess.run([sys.executable, *args], env=full, capture_output=True, text=True, timeout=timeout)


def hub_env(mirror: Mirror, tmp_path: Path, **extra) -> dict:
    return {"HF_ENDPOINT": mirror.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
            "HF_TOKEN": TOKEN, "CHATSTREAM_TERMINATION_LOG": str(tmp_path / "termination-log"), **extra}


def fill(env: dict, ready: Path, model: str = f"hf:{REPO}") -> subprocess.CompletedProcess:
    return run(["-m", "chatstream", "prepare-model", "--model", model, "--revision", "main",
                "--ready-file", str(ready)], env)


def tree(root: Path) -> dict:
    """Every path under root with its size and modification time: what a read-only mount would protect."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def test_the_fill_downloads_once_and_pods_load_offline_from_it(mirror, model_dir, tmp_path):
    env = hub_env(mirror, tmp_path)
    ready = tmp_path / "hub-volume" / "ready" / "chatstream-tests--smollm2.json"
    first = fill(env, ready)
    assert first.returncode == 0, first.stderr
    # Progress as whole lines, which `kubectl logs -f job/...` shows while it runs.
    assert "Fetching 6 files: 6 of 6" in first.stdout, first.stdout
    assert f"filled hf:{REPO}@main: commit {mirror.commit}" in first.stdout
    done = json.loads(ready.read_text())
    assert done["commit"] == mirror.commit and done["files"] == 6
    assert done["bytes"] == sum(p.stat().st_size for p in model_dir.iterdir())
    # The real client's requests: the revision, the file listing, then each file.
    assert f"GET /api/models/{REPO}/revision/main 200" in mirror.requests
    assert f"GET /{REPO}/resolve/{mirror.commit}/model.safetensors 200" in mirror.requests
    snapshot = tmp_path / "hub" / "models--chatstream-tests--smollm2" / "snapshots" / mirror.commit
    assert (snapshot / "model.safetensors").stat().st_size == (model_dir / "model.safetensors").stat().st_size
    assert (tmp_path / "hub" / "models--chatstream-tests--smollm2" / "refs" / "main").read_text() == mirror.commit

    # Once per model and revision: a second fill finds the ready file and asks nothing.
    asked = len(mirror.requests)
    again = fill(env, ready)
    assert again.returncode == 0 and "in the cache already" in again.stdout, again.stdout + again.stderr
    assert len(mirror.requests) == asked

    # A pod: HF_HUB_OFFLINE=1 over the filled cache. It answers, sends nothing
    # to the hub (the mirror is still there to be asked) and writes nothing
    # into the cache (the pods mount it read-only).
    before = tree(tmp_path / "hub")
    pod = run(["-c", ANSWER, f"hf:{REPO}"], hub_env(mirror, tmp_path, HF_HUB_OFFLINE="1", HF_TOKEN=""))
    assert pod.returncode == 0, pod.stderr[-3000:]
    assert "Paris" in pod.stdout, pod.stdout
    assert len(mirror.requests) == asked, mirror.requests[asked:]
    assert tree(tmp_path / "hub") == before
    # The token the fill used is in no log line (kubectl logs job/...) and in no ready file.
    for text in (first.stdout, first.stderr, again.stdout, again.stderr, ready.read_text()):
        assert TOKEN not in text


def test_a_pod_without_a_cache_downloads_through_transformers(mirror, tmp_path):
    """The path of an hf: model without spec.model.cache (and the node test's
    comparison pod): transformers' from_pretrained asks the hub file by file,
    including optional files the repo lacks, which must come back as the hub's
    EntryNotFound for transformers to go on."""
    asked = len(mirror.requests)
    pod = run(["-c", ANSWER, f"hf:{REPO}"], hub_env(mirror, tmp_path))
    assert pod.returncode == 0, pod.stderr[-3000:]
    assert "Paris" in pod.stdout, pod.stdout
    new = mirror.requests[asked:]
    assert f"GET /{REPO}/resolve/{mirror.commit}/model.safetensors 200" in new, new
    assert any(r.endswith(" 404") for r in new), "no optional file was looked for: the test no longer covers that"


def test_fill_failures_say_whether_another_try_can_help(mirror, tmp_path):
    ready = tmp_path / "ready.json"
    # No token (or a wrong one) for a gated repo, or no such repo: final (the Job's podFailurePolicy stops at once).
    for env, model, says in [
        (hub_env(mirror, tmp_path, HF_TOKEN=""), f"hf:{REPO}", "GatedRepoError"),
        (hub_env(mirror, tmp_path, HF_TOKEN=TOKEN + "-revoked"), f"hf:{REPO}", "GatedRepoError"),
        (hub_env(mirror, tmp_path), "hf:chatstream-tests/no-such-model", "RepositoryNotFoundError"),
    ]:
        proc = fill(env, ready, model)
        assert proc.returncode == model_cache.EXIT_FINAL == 2, proc.stderr
        message = (tmp_path / "termination-log").read_text()
        assert says in message and model in message, message
        # What status shows (the termination message) and the log never hold the token.
        assert TOKEN not in message + proc.stdout + proc.stderr
    # The hub out of reach: worth another try (the Job retries with back-off).
    closed = hub_env(mirror, tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    proc = fill(closed, ready)
    assert proc.returncode == 1, proc.stderr
    assert "cannot download" in (tmp_path / "termination-log").read_text()
    assert not ready.exists()
