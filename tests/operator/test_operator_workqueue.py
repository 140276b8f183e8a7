"""The work queue: one reconcile at a time per resource, bursts folded."""

from __future__ import annotations

import asyncio

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


def test_a_burst_of_events_costs_two_runs_and_never_overlaps():
    async def main():
        work = Recorder(hold=0.5)
        q = WorkQueue(work)
        for _ in range(20):  # e.g. a rollout's pod and Deployment events, within one run
            q.trigger("a")
            await asyncio.sleep(0)
        await q.drain()
        return work
    work = asyncio.run(main())
    assert work.runs == ["a", "a"] and work.overlaps == 0


def test_an_event_after_a_run_runs_again():
    async def main():
        work = Recorder(hold=0)
        q = WorkQueue(work)
        q.trigger("a")
        await q.drain()
        q.trigger("a")
        await q.drain()
        return work
    assert asyncio.run(main()).runs == ["a", "a"]


def test_resources_do_not_wait_for_each_other():
    async def main():
        work = Recorder(hold=0.2)
        q = WorkQueue(work)
        q.trigger("a")
        q.trigger("b")
        await asyncio.sleep(0.05)
        both = set(work.active)
        await q.drain()
        return both
    assert asyncio.run(main()) == {"a", "b"}


def test_a_failed_run_retries_after_its_delay_unless_forgotten():
    async def main(forget: bool):
        work = Recorder(retry=[0.05], hold=0)
        q = WorkQueue(work)
        q.trigger("a")
        await q.drain()
        if forget:
            q.forget("a")  # the resource was deleted
        await asyncio.sleep(0.15)
        await q.drain()
        return work.runs
    assert asyncio.run(main(False)) == ["a", "a"]
    assert asyncio.run(main(True)) == ["a"]


def test_a_run_in_between_replaces_the_pending_retry():
    async def main():
        work = Recorder(retry=[0.1], hold=0)
        q = WorkQueue(work)
        q.trigger("a")          # fails, retry in 0.1 s
        await q.drain()
        q.trigger("a")          # an event: runs now, succeeds
        await q.drain()
        await asyncio.sleep(0.2)
        await q.drain()
        return work.runs
    assert asyncio.run(main()) == ["a", "a"]
