"""Model sources: builtin, a local directory, a GGUF file, a hub id served offline from a hub cache."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from chatstream.loader import ModelLoadError, builtin_gguf, load_model, parse_source, prepare_builtin


@pytest.fixture(scope="module")
def converted():
    return prepare_builtin("smollm2-135m-instruct")


def greedy(model, tok, text="What is the capital of France?"):
    import torch
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_local_directory(converted):
    model, tok = load_model(str(converted), device="cpu")
    assert "Paris" in greedy(model, tok)
    assert model.served_name == converted.name


def test_the_converted_model_carries_no_gguf_marker(converted, tmp_path, monkeypatch):
    # The weights are plain floats: the GGUF quantization_config that save_pretrained copies would make
    # transformers attach its GGUF quantizer to every load, and vLLM refuse the directory.
    import json
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    model, _ = load_model(str(converted), device="cpu", dtype="bfloat16")
    assert getattr(model, "hf_quantizer", None) is None
    # A conversion cached by an older version (marker still there) is cleaned when it is next used.
    monkeypatch.setenv("CHATSTREAM_CACHE_DIR", str(tmp_path))
    old = tmp_path / "models" / converted.name
    shutil.copytree(converted, old)
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (old / "config.json").write_text(json.dumps(config))
    assert prepare_builtin(converted.name) == old
    assert json.loads((old / "config.json").read_text()) == {
        k: v for k, v in config.items() if k != "quantization_config"}


def test_hub_id_offline_from_a_hub_cache(converted, tmp_path, monkeypatch):
    """hf:ORG/NAME resolves through huggingface_hub's cache layout with the hub offline."""
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(converted, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model, tok = load_model("hf:acme/tiny-chat", device="cpu")
    assert "Paris" in greedy(model, tok)
    assert model.served_name == "acme/tiny-chat"
    with pytest.raises(ModelLoadError, match="acme/missing"):
        load_model("hf:acme/missing", device="cpu")


def test_gguf_file():
    model, tok = load_model(str(builtin_gguf("smollm2-135m-instruct")), device="cpu")
    assert "Paris" in greedy(model, tok)


def test_corrupt_weights_name_the_path(converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_model(str(broken), device="cpu")
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model(str(gguf), device="cpu")


@pytest.mark.parametrize("source, words", [
    ("", "no model source"),
    ("builtin:gpt-5", "unknown builtin model"),
    ("hf:just-a-name", "hf:ORG/NAME"),
    ("/no/such/dir", "unknown model source"),
    ("/no/such/file.gguf", "GGUF file not found"),
])
def test_bad_sources(source, words):
    with pytest.raises(ModelLoadError, match=words):
        parse_source(source)


def test_revision_from_source_or_argument():
    assert parse_source("hf:org/name@v2").revision == "v2"
    assert parse_source("hf:org/name", revision="abc").revision == "abc"


def test_cli_help_and_bad_model():
    out = subprocess.run([sys.executable, "-m", "chatstream", "serve", "--help"], capture_output=True, text=True)
    for flag in ("--model", "--host", "--port", "--max-concurrent", "--max-queue", "--max-new-tokens", "--device",
                 "--dtype", "CHATSTREAM_MODEL", "CHATSTREAM_MAX_CONCURRENT"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "chatstream", "serve", "--model", "nope:thing"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown model source" in bad.stderr
    env_bad = subprocess.run([sys.executable, "-m", "chatstream", "serve"], capture_output=True, text=True,
                             timeout=60, env={"CHATSTREAM_MAX_CONCURRENT": "many", "PATH": ""})
    assert env_bad.returncode != 0 and "CHATSTREAM_MAX_CONCURRENT" in env_bad.stderr
