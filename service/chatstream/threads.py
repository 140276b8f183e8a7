"""How many CPU threads the model runs on.

Why: torch sizes its thread pool by the CPUs the process may be scheduled on.
In a container that is every core of the node, not the pod's CPU limit, which
the kernel enforces as a CFS quota instead. A pod limited to 2 CPUs on a
64-core node would run 64 threads inside a 2-CPU quota, be throttled for most
of each period, and stall every stream. So, unless told otherwise, the server
uses no more threads than its cgroup quota allows (rounded down, at least one).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

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


def choose_threads(requested: int, schedulable: int, limit: float | None) -> int:
    """``requested`` when set (> 0); otherwise the schedulable CPUs, capped by the quota."""
    if requested > 0:
        return requested
    if limit is None:
        return schedulable
    return max(1, min(schedulable, math.floor(limit)))


def configure(requested: int = 0) -> int:
    """Set torch's intra-op threads for this process and return how many."""
    import torch
    limit = cgroup_cpu_limit()
    threads = choose_threads(requested, len(os.sched_getaffinity(0)), limit)
    torch.set_num_threads(threads)
    log.info("model threads: %d (%s)", threads, "set" if requested > 0 else
             f"CPU quota {limit:g}" if limit is not None else "schedulable CPUs")
    return threads
