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

OpenMP (torch's thread pool) makes a thread that reaches the end of a parallel
region spin for a while before it sleeps. A pod that owns its cores gains from
it (one pod of 2 threads on a 2-core node: 81 tok/s spinning, 70 sleeping), but
a thread that spins while its partner waits for a CPU stalls the pod: two pods
of 2 threads, each requesting 0.92 CPU, served 8 tok/s spinning and 45 sleeping.
So when the threads exceed the pod's request by more than ``SPIN_SLACK`` (a
request rounded up, or ``CHATSTREAM_THREADS`` above it), the server sets
``OMP_WAIT_POLICY=PASSIVE`` before torch loads OpenMP, unless the variable is
already set. Threads are not bound to cores (``OMP_PROC_BIND``): without the
kubelet's static CPU manager every pod would bind to the same first cores.
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


# How far the threads may exceed the CPU request and still spin-wait (a pod of 1.85 CPUs runs 2 threads).
SPIN_SLACK = 0.25


def passive_wait(threads: int, request: float | None) -> bool:
    """Whether OpenMP's threads should sleep rather than spin: more threads than the request covers."""
    return request is not None and threads > request + SPIN_SLACK


def _decide(requested: int) -> tuple[Choice, float | None, float | None, int]:
    limit, request = cgroup_cpu_limit(), cpu_request()
    schedulable = len(os.sched_getaffinity(0))
    return choose_threads(requested, schedulable, limit, request), limit, request, schedulable


def set_wait_policy(requested: int = 0, environ=os.environ) -> str | None:
    """Before torch is imported: ``OMP_WAIT_POLICY=PASSIVE`` where :func:`passive_wait` says so, unless set."""
    if "OMP_WAIT_POLICY" in environ:
        return None
    choice, _, request, _ = _decide(requested)
    if passive_wait(choice.threads, request):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return None


_chosen: Choice | None = None


def info() -> dict[str, str]:
    """The model's threads and what they came from, for ``chatstream_engine_info``."""
    import torch
    return {"threads": str(torch.get_num_threads()), "threads_from": _chosen.reason if _chosen else "torch"}


def configure(requested: int = 0) -> Choice:
    """Set torch's intra-op threads for this process and say why."""
    global _chosen
    import torch
    choice, limit, request, schedulable = _decide(requested)
    torch.set_num_threads(choice.threads)
    _chosen = choice
    given = {"set": lambda: f"set by {envvars.THREADS}", "limit": lambda: f"CPU limit {limit:g}",
             "request": lambda: f"CPU request {request:g}",
             "schedulable": lambda: "no CPU limit or request"}[choice.reason]()
    log.info("model threads: %d (%s; %d schedulable CPUs; OMP_WAIT_POLICY=%s)", choice.threads, given,
             schedulable, os.environ.get("OMP_WAIT_POLICY", "unset"))
    return choice
