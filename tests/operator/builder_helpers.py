"""Helpers for the builder tests: specs as the API server would store them, and haproxy's own
check of a rendered config."""

from __future__ import annotations

import copy
import pathlib
import shutil
import subprocess

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "manifests/crd.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ROUTER_IMAGE = "localhost/chatstream-router:test"


def haproxy_check(config: str, tmp_path) -> subprocess.CompletedProcess:
    assert shutil.which(HAPROXY), "haproxy is not installed (scripts/system-deps.sh installs it)"
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)


def apply_defaults(value, schema):
    """Structural defaulting as the API server does it, from the CRD itself,
    so the tests see the same defaults the builders get in a cluster."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    for key, sub in schema["properties"].items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = apply_defaults(value[key], sub)
    return value


def make_resource(spec: dict | None = None, name: str = "chat", namespace: str = "team-a", generation: int = 1) -> dict:
    spec = copy.deepcopy(spec) if spec else {"model": {"source": "builtin:smollm2-135m-instruct"}}
    return {
        "apiVersion": "chatstream.io/v1alpha1",
        "kind": "ChatStreamDeployment",
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1234", "generation": generation},
        "spec": apply_defaults(spec, SCHEMA),
    }
