"""podman as this machine needs it: crun fails on this kernel's cgroups, runc works
(scripts/lib.sh has the same wrapper for the scripts)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

RUNC = "/usr/sbin/runc"
PODMAN = ["podman", "--runtime", RUNC]


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def have_podman() -> bool:
    return shutil.which("podman") is not None and pathlib.Path(RUNC).exists()


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0
