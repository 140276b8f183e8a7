"""Helpers for the builder tests: specs as the API server would store them."""

from __future__ import annotations

import copy
import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "manifests/crd.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


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
