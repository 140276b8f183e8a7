"""The work queue: one reconcile at a time per resource, bursts folded."""

from __future__ import annotations

import asyncio

import pytest

from chatstream_operator.workqueue import WorkQueue


class Recorder:
    def __init__(self, retry=None, hold: float = 0.05):
        self.runs: list = []
        self.active: set = set()
        self.overlaps = 0
        self.retry, self.hold = retry, hold

    async def __call__(self, key):
        if key in self.active:
            self.overlaps += 1
        self.active.add(key)
        self.runs.append(key)
        await asyncio.sleep(self.hold)
        self.active.discard(key)
        return self.retry.pop(0) if self.retry else None


def run(script, retry=None, hold: float = 0.0) -> Recorder:
    """`script(queue, work)` against a fresh queue over a Recorder; the Recorder after it."""
    async def main():
        work = Recorder(retry=retry, hold=hold)
        await script(WorkQueue(work), work)
        return work
    return asyncio.run(main())


async def run_once(q: WorkQueue, key: str = "a") -> None:
    q.trigger(key)
    await q.drain()


def test_a_burst_of_events_costs_two_runs_and_never_overlaps():
    async def burst(q, work):
        for _ in range(20):  # e.g. a rollout's pod and Deployment events, within one run
            q.trigger("a")
            await asyncio.sleep(0)
        await q.drain()
    work = run(burst, hold=0.5)
    assert work.runs == ["a", "a"] and work.overlaps == 0


def test_an_event_after_a_run_runs_again():
    async def twice(q, work):
        await run_once(q)
        await run_once(q)
    assert run(twice).runs == ["a", "a"]


def test_resources_do_not_wait_for_each_other():
    both = set()

    async def two_resources(q, work):
        q.trigger("a")
        q.trigger("b")
        await asyncio.sleep(0.05)
        both.update(work.active)
        await q.drain()
    run(two_resources, hold=0.2)
    assert both == {"a", "b"}


@pytest.mark.parametrize("forget, runs", [(False, ["a", "a"]), (True, ["a"])])
def test_a_failed_run_retries_after_its_delay_unless_forgotten(forget, runs):
    async def fail_once(q, work):
        await run_once(q)
        if forget:
            q.forget("a")  # the resource was deleted
        await asyncio.sleep(0.15)
        await q.drain()
    assert run(fail_once, retry=[0.05]).runs == runs


def test_a_run_in_between_replaces_the_pending_retry():
    async def event_before_retry(q, work):
        await run_once(q)       # fails, retry in 0.1 s
        await run_once(q)       # an event: runs now, succeeds
        await asyncio.sleep(0.2)
        await q.drain()
    assert run(event_before_retry, retry=[0.1]).runs == ["a", "a"]
