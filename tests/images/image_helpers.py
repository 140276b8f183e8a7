"""Helpers for the image tests: podman with the flags this sandbox needs."""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
TAG = "0.1.0"
SERVICE_IMAGE = f"localhost/chatstream:{TAG}"
OPERATOR_IMAGE = f"localhost/chatstream-operator:{TAG}"
# crun fails on this kernel's cgroups; runc works.
PODMAN = ["podman", "--runtime", "/usr/sbin/runc"]


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def have_podman() -> bool:
    return shutil.which("podman") is not None and pathlib.Path("/usr/sbin/runc").exists()


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
