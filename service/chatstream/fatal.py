"""Saying why a process cannot go on, where Kubernetes reads it.

Light on purpose (no torch, no server): the model cache's fill Job reports
through it as well as the server.
"""

from __future__ import annotations

import os
import sys

from . import envvars


def report_fatal(message: str) -> None:
    """Say why the process stops: on stderr and in the termination log when there is one."""
    print(message, file=sys.stderr)
    path = os.environ.get(envvars.TERMINATION_LOG, "/dev/termination-log")
    if path and os.path.exists(os.path.dirname(path) or "."):
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(message[-4000:])  # Kubernetes keeps at most 4096 bytes
        except OSError:
            pass
