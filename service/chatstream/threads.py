"""How many CPU threads the model runs on.

Why: torch sizes its thread pool by the CPUs the process may be scheduled on.
In a container that is every core of the node, whatever the pod was given. A
pod with a CPU limit gets a CFS quota; a pod with only a request gets a share
of the node (its cgroup's CPU weight), and shares the cores with every other
pod. OpenMP's parallel regions wait for their slowest thread, so a model that
runs more threads than it has CPUs stalls whenever one of them is preempted:
measured on a 2-core node, two pods with two threads each served 0.11x of one
bare process (docs/operator.md). So, unless told otherwise, the server runs
as many threads as the pod was given:

- its CPU limit (the quota, read from the cgroup), rounded down, when it has one;
- else its CPU request (``CHATSTREAM_CPU_REQUEST``, millicores, which the
  operator fills from the downward API), rounded to the nearest whole CPU;
- else the schedulable CPUs (a bare process, or a container started by hand);

never more than the schedulable CPUs and never fewer than one.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import envvars

log = logging.getLogger("chatstream")

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 or v1), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]          # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())        # v1: -1 when unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_request(environ=os.environ) -> float | None:
    """The pod's CPU request in CPUs, from the millicores the downward API puts in the environment."""
    try:
        millis = int(environ.get(envvars.CPU_REQUEST, ""))
    except ValueError:
        return None
    return millis / 1000 if millis > 0 else None


@dataclass(frozen=True)
class Choice:
    threads: int
    reason: str     # what the count came from, for the log and chatstream_engine_info


def choose_threads(requested: int, schedulable: int, limit: float | None, request: float | None = None) -> Choice:
    """``requested`` when set (> 0); otherwise the CPU limit, else the CPU request, else the schedulable CPUs."""
    if requested > 0:
        return Choice(requested, "set")
    if limit is not None:
        return Choice(max(1, min(schedulable, math.floor(limit))), "limit")
    if request is not None:
        return Choice(max(1, min(schedulable, math.floor(request + 0.5))), "request")
    return Choice(schedulable, "schedulable")


_chosen: Choice | None = None


def info() -> dict[str, str]:
    """The model's threads and what they came from, for ``chatstream_engine_info``."""
    import torch
    return {"threads": str(torch.get_num_threads()), "threads_from": _chosen.reason if _chosen else "torch"}


def configure(requested: int = 0) -> Choice:
    """Set torch's intra-op threads for this process and say why."""
    global _chosen
    import torch
    limit, request = cgroup_cpu_limit(), cpu_request()
    schedulable = len(os.sched_getaffinity(0))
    choice = choose_threads(requested, schedulable, limit, request)
    torch.set_num_threads(choice.threads)
    _chosen = choice
    given = {"set": lambda: f"set by {envvars.THREADS}", "limit": lambda: f"CPU limit {limit:g}",
             "request": lambda: f"CPU request {request:g}",
             "schedulable": lambda: "no CPU limit or request"}[choice.reason]()
    log.info("model threads: %d (%s; %d schedulable CPUs; OMP_WAIT_POLICY=%s)", choice.threads, given,
             schedulable, os.environ.get("OMP_WAIT_POLICY", "unset"))
    return choice
