"""The machine a benchmark runs on: its CPU, its load, and where results go.

Every speed figure is printed with the CPU it was measured on; a timed run waits for a
quiet machine (the load average) and records whether it got one.
"""

from __future__ import annotations

import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
RESULTS = BENCH / "results"
# CPU features that decide which kernels are fast; a report names those present
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# the ones that decide bfloat16's speed (the dtype benchmarks' CPU line)
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def sh(cmd: list[str], timeout: float = 120) -> str:
    """A command's output, run in the project root; a failure is told in the text, never raised."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT)).stdout.strip()
    except Exception as exc:
        return f"unavailable ({exc})"


def cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and its flags, from /proc/cpuinfo (the first CPU's)."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return model or platform.processor() or "unknown", flags


def cpu_description(wanted=BF16_FLAGS) -> dict:
    model, flags = cpuinfo()
    return {"model": model, "flags": [f for f in wanted if f in flags]}


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def stop_servers_on_sigterm() -> None:
    """SIGTERM (timeout, kill) unwinds like Ctrl-C, so the server under test is stopped too:
    each runs in its own process group and would outlive the benchmark otherwise."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def wait_for_quiet(limit: float, max_wait_s: float) -> bool:
    waited = 0.0
    while True:
        la = loadavg()
        if la[0] < limit:
            return True
        if waited >= max_wait_s:
            log(f"load average still {la[0]:.2f} after {waited / 60:.0f} min: running anyway (recorded as not quiet)")
            return False
        log(f"load average {la[0]:.2f} >= {limit}: waiting a minute for a quieter machine ...")
        time.sleep(60)
        waited += 60


class Sampler:
    """Calls ``sample()`` every ``period`` s on a thread, between start() and stop() (or as a context)."""

    def __init__(self, period: float):
        self.period, self._stop = period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
