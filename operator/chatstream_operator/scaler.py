"""The autoscaler's loop: one asyncio task per resource with spec.autoscaling.

Each step reads the load from the resource's activator (activator.py, in the
router pod: `/signal`, a long poll that answers at once when a request starts
being held, else after about a second), keeps the samples of the last window
and scale-down delay, asks autoscale.decide, and acts on a change: it writes
spec.replicas (the one writer while spec.autoscaling is set; the reconcile
carries it to the Deployment, as for `kubectl scale`), status.autoscaling and
an Event. The resource's latest body comes from the operator's watch
(`update`), so a step costs the API server nothing unless it scales.

Why not a kopf daemon or timer, which would start and stop these loops:
kopf puts a finalizer on every resource that has one (deleting a resource
would then need a running operator), and this operator keeps no kopf
bookkeeping on resources (docs/operator.md). Scalers is the forty lines
that replace it, fed by the event handler the operator already has.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Hashable

import aiohttp

from . import activation, autoscale, router

log = logging.getLogger("chatstream_operator")

INTERVAL_SECONDS = 1.0   # a sample about this often
MIN_STEP_SECONDS = 0.1   # however fast requests start being held
# After writing replicas, the watch may still deliver older bodies for a
# moment: the written value stands for this long unless the watch agrees.
PENDING_SECONDS = 10.0


def signal_url(body: dict) -> str:
    meta = body["metadata"]
    host = f"{router.router_name(meta['name'])}.{meta['namespace']}.svc.{router.CLUSTER_DOMAIN}"
    return f"http://{host}:{activation.CONTROL_PORT}/signal"


class SignalReader:
    """GET /signal of a resource's activator (aiohttp: the operator's own dependency through kopf)."""

    def __init__(self, url_of: Callable[[dict], str] = signal_url):
        self.url_of = url_of
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, body: dict, since: int, wait: float) -> dict:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=wait + 5, connect=2)
        async with self._session.get(self.url_of(body), params={"wait": str(wait), "since": str(since)},
                                     timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {(await resp.text())[:200]}")
            return await resp.json()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def status_of(decision: autoscale.Decision, body: dict, held: int, wall: str) -> dict:
    """status.autoscaling after a decision (kubectl get csd shows its reason)."""
    return {
        "desiredReplicas": decision.replicas,
        "currentReplicas": (body.get("status") or {}).get("replicas", 0),
        "load": round(decision.load, 2) if decision.load is not None else None,
        "heldRequests": held,
        "reason": decision.reason,
        "message": decision.message,
        "lastScaleTime": wall,
    }


def _wall() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Scaler:
    def __init__(self, body: dict, read_signal: Callable[[dict, int, float], Awaitable[dict]],
                 act: Callable[[dict, autoscale.Decision, dict], Awaitable[bool | None]],
                 interval: float = INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic):
        """read_signal(body, since, wait) -> the activator's /signal answer;
        act(body, decision, status.autoscaling) writes a change (False:
        not written, spec.autoscaling changed since `body`)."""
        self.body, self.read_signal, self.act = body, read_signal, act
        self.interval, self.clock = interval, clock
        self.samples: list[autoscale.Sample] = []
        self.since = -1          # the activator's held_total last seen
        self.pending: tuple[int, float] | None = None
        self.failing: str | None = None
        self.decisions: list[autoscale.Decision] = []  # the changes made (tests, logs)

    def update(self, body: dict) -> None:
        self.body = body

    def current(self) -> int:
        """The desired count now: spec.replicas, or what this scaler wrote
        last while the watch has not shown it yet."""
        seen = self.body["spec"].get("replicas", 1)
        if self.pending is not None:
            value, at = self.pending
            if seen != value and self.clock() - at < PENDING_SECONDS:
                return value
            self.pending = None
        return seen

    async def _sample(self) -> dict | None:
        try:
            signal = await self.read_signal(self.body, self.since, self.interval)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
            if self.failing is None:
                log.warning("no load signal from the router (%s); scaling down waits", problem, extra=self._ref())
            self.failing = problem
            await asyncio.sleep(self.interval)
            return None
        if self.failing is not None:
            log.info("load signal from the router again", extra=self._ref())
            self.failing = None
        return signal

    def _ref(self) -> dict:
        meta = self.body["metadata"]
        return {"k8s_ref": {"apiVersion": self.body.get("apiVersion"), "kind": self.body.get("kind"),
                            "namespace": meta["namespace"], "name": meta["name"]}}

    async def step(self) -> autoscale.Decision | None:
        policy = autoscale.policy(self.body["spec"])
        if policy is None:
            return None
        signal = await self._sample()
        now = self.clock()
        held = 0
        if signal is not None:
            held = int(signal.get("held", 0))
            self.samples.append(autoscale.Sample(now, float(signal["load"]), held))
            self.since = int(signal.get("held_total", self.since))
        keep_from = now - (policy.scale_down_delay + policy.window + autoscale.MAX_GAP_SECONDS)
        if self.samples and self.samples[0].at < keep_from:
            self.samples = [s for s in self.samples if s.at >= keep_from]
        ready = (self.body.get("status") or {}).get("readyReplicas")
        decision = autoscale.decide(policy, self.samples, self.current(), now, ready)
        if decision.changed:
            if await self.act(self.body, decision, status_of(decision, self.body, held, _wall())) is False:
                log.info("autoscaling: %s not written: spec.autoscaling is no longer the one it rested on",
                         decision.reason, extra=self._ref())
                return decision
            self.pending = (decision.replicas, self.clock())
            self.decisions.append(decision)
            log.info("autoscaling: %s: %s", decision.reason, decision.message, extra=self._ref())
        return decision

    async def run(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # an API refusal writing a decision: the next step tries again
                log.exception("autoscaling step failed", extra=self._ref())
                await asyncio.sleep(self.interval)
            await asyncio.sleep(max(0.0, MIN_STEP_SECONDS - (self.clock() - started)))


class Scalers:
    """The running Scaler of each resource with spec.autoscaling."""

    def __init__(self, make: Callable[[dict], Scaler]):
        self.make = make
        self.scalers: dict[Hashable, Scaler] = {}
        self.tasks: dict[Hashable, asyncio.Task] = {}

    def update(self, key: Hashable, body: dict) -> None:
        """A new body of the resource: start, feed or stop its scaler."""
        if autoscale.policy(body.get("spec") or {}) is None or body["metadata"].get("deletionTimestamp"):
            self.stop(key)
            return
        scaler = self.scalers.get(key)
        if scaler is None:
            scaler = self.scalers[key] = self.make(body)
            self.tasks[key] = asyncio.get_running_loop().create_task(scaler.run(), name=f"autoscale {key}")
        else:
            scaler.update(body)

    def stop(self, key: Hashable) -> None:
        self.scalers.pop(key, None)
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for key in list(self.tasks):
            self.stop(key)
        await asyncio.gather(*tasks, return_exceptions=True)
