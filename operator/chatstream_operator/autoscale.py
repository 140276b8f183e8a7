"""How many pods a resource should run: a pure function of the load seen.

The signal (a Sample) is the resource's whole load at one instant: requests
in flight at its pods and queued in its router (HAProxy's own counters) plus
requests the activator holds while no pod is up (activator.py). It needs no
Prometheus and has no scrape lag: the operator reads it from the router pod
about once a second, and at once when the activator starts holding a request.

The rules (docs/autoscaling.md says why):

- The recommendation at an instant is ceil(mean load / target): the mean of
  the samples of the last `window` seconds, against an absolute target of
  requests per pod. At least 1 while anything is in flight or held, and
  within [min, max].
- Scale up at once to the recommendation when it is above the desired count.
  The desired count includes pods that are still starting, and the target is
  absolute, so a pod that is slow to start adds no more pods: the load it
  will take is already counted for it (a ratio of load per *ready* pod would
  double the pods while new ones start, AIBrix's 2->4->8->16).
- Scale down to the highest recommendation of the last `scale_down_delay`
  seconds, and only when the samples cover that whole delay without a gap (a
  restarted operator, or a router it could not read, scales nothing down
  until it has seen a whole delay). One short dip never removes a pod; a
  burst within the delay keeps the pods it needed.
- A desired count outside [min, max] (the spec changed) goes to the nearest
  bound at once.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

# Samples further apart than this leave a hole in what was seen: no
# scale-down decision may rest on it.
MAX_GAP_SECONDS = 5.0
DEFAULTS = {"minReplicas": 1, "maxReplicas": 4, "windowSeconds": 10, "scaleDownDelaySeconds": 300}


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target: float             # requests in flight, queued or held per pod
    window: float             # seconds averaged
    scale_down_delay: float   # seconds the load must have called for fewer pods


@dataclass(frozen=True)
class Sample:
    at: float                 # seconds, on a monotonic clock
    load: float               # in flight + queued + held, the whole resource
    held: int = 0             # of which the activator holds (no pod was up)


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    message: str
    changed: bool
    load: float | None = None  # the window's mean load the decision rests on


def policy(spec: dict) -> Policy | None:
    """spec.autoscaling as a Policy (None when it is not set). The target
    defaults to the pods' maxConcurrentStreams: a pod is full when every slot
    streams, and more load would queue."""
    a = spec.get("autoscaling")
    if a is None:
        return None
    a = {**DEFAULTS, **a}
    target = a.get("targetRequestsPerPod") or (spec.get("concurrency") or {}).get("maxConcurrentStreams", 8)
    return Policy(a["minReplicas"], a["maxReplicas"], float(target), float(a["windowSeconds"]),
                  float(a["scaleDownDelaySeconds"]))


class Window:
    """Mean load over the `window` seconds up to any instant, from samples
    sorted by time (prefix sums: a whole delay of samples costs O(n log n))."""

    def __init__(self, samples: list[Sample], window: float):
        self.samples, self.window = samples, window
        self.times = [s.at for s in samples]
        self.sums = [0.0]
        for s in samples:
            self.sums.append(self.sums[-1] + s.load)

    def mean(self, at: float) -> tuple[float, int] | None:
        """(mean load, samples) over (at - window, at], or None without a sample there."""
        hi = bisect.bisect_right(self.times, at)
        lo = bisect.bisect_right(self.times, at - self.window)
        if hi <= lo:
            return None
        return (self.sums[hi] - self.sums[lo]) / (hi - lo), hi - lo

    def latest(self, at: float) -> Sample | None:
        hi = bisect.bisect_right(self.times, at)
        return self.samples[hi - 1] if hi else None


def _clamp(p: Policy, n: int) -> int:
    return max(p.min_replicas, min(p.max_replicas, n))


def recommend(p: Policy, w: Window, at: float) -> int | None:
    """Pods the load called for at `at`, or None when nothing was seen in the window."""
    found = w.mean(at)
    if found is None:
        return None
    # A tiny epsilon: 8.000000001 requests over a target of 4 is 2 pods, not 3.
    n = math.ceil(found[0] / p.target - 1e-9)
    if w.latest(at).load > 0:
        n = max(n, 1)  # anything in flight or held needs a pod
    return _clamp(p, n)


def covered(samples: list[Sample], since: float, now: float) -> bool:
    """Whether the samples cover [since, now] with no hole longer than MAX_GAP_SECONDS."""
    if not samples or samples[0].at > since:
        return False
    times = [s.at for s in samples if s.at >= since] + [now]
    last = max((s.at for s in samples if s.at < since), default=since)
    for t in times:
        if t - last > MAX_GAP_SECONDS:
            return False
        last = t
    return True


def decide(p: Policy, samples: list[Sample], current: int, now: float, ready: int | None = None) -> Decision:
    """The desired replicas at `now`, given the samples (sorted by time; older
    ones than the window plus the delay are not needed) and the current
    desired count (which counts pods still starting)."""
    pods = f"{current} desired" + (f", {ready} ready" if ready is not None else "")
    if current < p.min_replicas:
        return Decision(p.min_replicas, "BelowMinimum", f"{current} -> {p.min_replicas}: autoscaling.minReplicas", True)
    if current > p.max_replicas:
        return Decision(p.max_replicas, "AboveMaximum", f"{current} -> {p.max_replicas}: autoscaling.maxReplicas", True)
    w = Window(samples, p.window)
    now_rec = recommend(p, w, now)
    if now_rec is None:
        return Decision(current, "NoSignal", f"no load sample in the last {p.window:g}s ({pods})", False)
    mean, count = w.mean(now)
    latest = w.latest(now)
    seen = (f"{mean:.2f} requests in flight, queued or held (mean of {count} samples over {p.window:g}s; "
            f"{latest.load:g} now, {latest.held} held), target {p.target:g} per pod")
    if now_rec > current:
        reason = "ScaledFromZero" if current == 0 else "ScaledUp"
        return Decision(now_rec, reason, f"{current} -> {now_rec}: {seen}", True, mean)
    if now_rec == current or not covered(samples, now - p.scale_down_delay, now):
        return Decision(current, "Steady", f"{seen}; {pods}", False, mean)
    since = now - p.scale_down_delay
    highest = now_rec
    for s in samples:
        if s.at >= since:
            highest = max(highest, recommend(p, w, s.at) or 0)
        if highest >= current:
            return Decision(current, "Steady", f"{seen}; {pods}; the last {p.scale_down_delay:g}s called for "
                                               f"{current}", False, mean)
    reason = "ScaledToZero" if highest == 0 else "ScaledDown"
    return Decision(highest, reason, f"{current} -> {highest}: at most {highest} pods called for over the last "
                                     f"{p.scale_down_delay:g}s; {seen}", True, mean)
