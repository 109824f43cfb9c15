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
        served: list[str] = []
        await admission.acquire()

        async def wait(name: str, priority: int) -> None:
            await admission.acquire(priority)
            served.append(name)
            admission.release()

        tasks = []
        for name, priority in (("a", 1), ("b", 0), ("c", 1), ("d", -2)):
            tasks.append(asyncio.create_task(wait(name, priority)))
            await asyncio.sleep(0)
        admission.release()
        await asyncio.gather(*tasks)
        assert admission.in_flight == 0 and admission.waiting == 0
        return served

    assert run(scenario()) == ["d", "b", "a", "c"]


def test_full_queue_and_timeout() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=1, queue_size=1, queue_timeout=0.05)
        await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await admission.acquire()
        with pytest.raises(QueueTimeout):
            await waiter
        assert admission.waiting == 0
        admission.release()
        assert admission.in_flight == 0

    run(scenario())


def test_cancelled_waiter_leaves_and_its_slot_is_not_lost() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=1, queue_size=5, queue_timeout=5)
        await admission.acquire()
        gone = asyncio.create_task(admission.acquire())
        stays = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert admission.waiting == 1
        admission.release()
        assert await stays == pytest.approx(0, abs=1)
        admission.release()
        assert admission.in_flight == 0

    run(scenario())


def test_abandoned_entries_are_compacted() -> None:
    async def scenario() -> None:
        admission = Admission(max_in_flight=1, queue_size=1000, queue_timeout=5)
        await admission.acquire()
        waiters = [asyncio.create_task(admission.acquire()) for _ in range(500)]
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert admission.waiting == 0 and len(admission._heap) <= 64

    run(scenario())
