"""What the image tests build and name (podman itself: support.podman)."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
TAG = "0.1.0"
SERVICE_IMAGE = f"localhost/chatstream:{TAG}"
OPERATOR_IMAGE = f"localhost/chatstream-operator:{TAG}"
