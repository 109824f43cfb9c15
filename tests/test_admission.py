"""Admission in isolation: slots, priority order, a bounded queue, and waiters that give up."""

from __future__ import annotations

import asyncio

import pytest

from inference_core.engine import Admission
from inference_core.errors import QueueFull, QueueTimeout


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_priority_then_arrival_order() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_in_flight=1, queue_size=10, queue_timeout=5)
        lane = admission.lane("default", admission.max_in_flight)
        served: list[str] = []
        await admission.acquire(lane)

        async def wait(name: str, priority: int) -> None:
            await admission.acquire(lane, priority)
            served.append(name)
            admission.release(lane)

        tasks = []
        for name, priority in (("a", 1), ("b", 0), ("c", 1), ("d", -2)):
            tasks.append(asyncio.create_task(wait(name, priority)))
            await asyncio.sleep(0)
            assert admission.waiting == len(tasks)  # queued in the order created
        admission.release(lane)
        await asyncio.gather(*tasks)
        assert admission.in_flight == 0 and admission.waiting == 0
        return served

    assert run(scenario()) == ["d", "b", "a", "c"]


def test_full_queue_and_timeout() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=1, queue_size=1, queue_timeout=0.05)
        lane = admission.lane("default", admission.max_in_flight)
        await admission.acquire(lane)
        waiter = asyncio.create_task(admission.acquire(lane))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await admission.acquire(lane)
        with pytest.raises(QueueTimeout):
            await waiter
        assert admission.waiting == 0
        admission.release(lane)
        assert admission.in_flight == 0

    run(scenario())


def test_cancelled_waiter_leaves_and_its_slot_is_not_lost() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=1, queue_size=5, queue_timeout=5)
        lane = admission.lane("default", admission.max_in_flight)
        await admission.acquire(lane)
        gone = asyncio.create_task(admission.acquire(lane))
        stays = asyncio.create_task(admission.acquire(lane))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert admission.waiting == 1
        admission.release(lane)
        assert await stays == pytest.approx(0, abs=1)
        admission.release(lane)
        assert admission.in_flight == 0

    run(scenario())


def test_abandoned_entries_are_compacted() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=1, queue_size=1000, queue_timeout=5)
        lane = admission.lane("default", admission.max_in_flight)
        await admission.acquire(lane)
        waiters = [asyncio.create_task(admission.acquire(lane)) for _ in range(500)]
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert admission.waiting == 0 and len(lane.heap) <= 64

    run(scenario())


def test_a_full_lane_does_not_hold_up_another() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=4, queue_size=10, queue_timeout=5)
        slow, fast = admission.lane("slow", 2), admission.lane("fast", 4)
        await admission.acquire(slow)
        await admission.acquire(slow)
        stuck = asyncio.create_task(admission.acquire(slow))
        await asyncio.sleep(0)
        assert await admission.acquire(fast) == 0.0  # no wait: the slow lane is full, not the gateway
        assert (slow.waiting, admission.waiting, admission.in_flight) == (1, 1, 3)
        admission.release(slow)
        await stuck
        assert (slow.in_flight, fast.in_flight, admission.in_flight) == (2, 1, 3)

    run(scenario())


def test_the_gateway_total_hands_slots_out_by_priority_across_lanes() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_in_flight=1, queue_size=10, queue_timeout=5)
        lanes = {"a": admission.lane("a", 1), "b": admission.lane("b", 1)}
        await admission.acquire(lanes["a"])
        served: list[str] = []

        async def wait(name: str, lane: str, priority: int) -> None:
            await admission.acquire(lanes[lane], priority)
            served.append(name)
            admission.release(lanes[lane])

        tasks = []
        for name, lane, priority in (("a1", "a", 1), ("b1", "b", 1), ("b0", "b", 0), ("a-1", "a", -1)):
            tasks.append(asyncio.create_task(wait(name, lane, priority)))
            await asyncio.sleep(0)
            assert admission.waiting == len(tasks)  # queued in the order created
        admission.release(lanes["a"])
        await asyncio.gather(*tasks)
        assert admission.in_flight == 0 and admission.waiting == 0
        return served

    assert run(scenario()) == ["a-1", "b0", "a1", "b1"]


def test_a_lane_never_exceeds_the_gateway_total() -> None:
    admission = Admission(max_in_flight=3, queue_size=1, queue_timeout=1)
    assert admission.lane("big", 100).max_in_flight == 3
