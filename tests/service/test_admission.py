"""Admission bookkeeping: order, limits, and release that is safe to repeat."""

from __future__ import annotations

import asyncio

import pytest

from chatstream.admission import Admission


def test_slots_then_queue_then_refusal():
    async def scenario():
        a = Admission(slots=2, max_queue=1)
        t1, t2, t3 = a.reserve(), a.reserve(), a.reserve()
        assert t1.granted and t2.granted and not t3.granted
        assert a.reserve() is None
        assert (a.processing, a.waiting) == (2, 1)
        a.release(t1)
        assert t3.granted and await t3.future
        a.release(t1)  # again: nothing changes
        assert (a.processing, a.waiting) == (2, 0)
        a.release(t2), a.release(t3)
        assert (a.processing, a.waiting) == (0, 0)
    asyncio.run(scenario())


def test_leaving_the_queue_keeps_order():
    async def scenario():
        a = Admission(slots=1, max_queue=3)
        running, q1, q2, q3 = (a.reserve() for _ in range(4))
        a.release(q2)  # left while queued
        assert q2.future.cancelled() and a.waiting == 2
        a.release(running)
        assert q1.granted and not q3.granted
        a.release(q1)
        assert q3.granted
        a.release(q3)
        assert (a.processing, a.waiting) == (0, 0)
    asyncio.run(scenario())


def test_invalid_limits():
    with pytest.raises(ValueError):
        Admission(0, 1)
    with pytest.raises(ValueError):
        Admission(1, -1)
