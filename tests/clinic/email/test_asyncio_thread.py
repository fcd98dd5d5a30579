"""The asyncio loop the mailer's aiosmtplib runs on, driven from trio."""

from __future__ import annotations

import asyncio
import gc

import pytest
import trio

from reactor.clinic.services.asyncio_thread import open_asyncio_thread


async def test_a_call_returns_the_coroutines_result_or_raises_its_exception() -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def fail() -> None:
        raise ValueError("from asyncio")

    async with open_asyncio_thread() as loop:
        assert await loop.call(double, 21) == 42
        with pytest.raises(ValueError, match="from asyncio"):
            await loop.call(fail)


async def test_calls_from_many_trio_tasks_run_at_the_same_time() -> None:
    """Each call waits until all of them have started: only concurrent calls finish."""
    tasks = 20
    started = 0
    all_started: asyncio.Event | None = None

    async def meet() -> int:
        nonlocal started, all_started
        if all_started is None:
            all_started = asyncio.Event()
        started += 1
        if started == tasks:
            all_started.set()
        await asyncio.wait_for(all_started.wait(), timeout=10)
        return started

    results: list[int] = []
    async with open_asyncio_thread() as loop:
        async def one() -> None:
            results.append(await loop.call(meet))

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(one)
    assert results == [tasks] * tasks


async def test_a_cancelled_caller_cancels_the_asyncio_task_and_waits_for_its_end() -> None:
    """Whatever the task held is released before the caller's cleanup runs."""
    events: list[str] = []

    async def hold() -> None:
        events.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            await asyncio.sleep(0.05)  # releasing takes a loop turn or two
            events.append("released")

    async with open_asyncio_thread() as loop:
        with trio.move_on_after(0.2) as scope:
            await loop.call(hold)
        assert scope.cancelled_caught
        assert events == ["started", "cancelled", "released"]


async def test_after_close_the_thread_is_gone_and_a_call_says_so() -> None:
    async with open_asyncio_thread(name="reactor-test-loop") as loop:
        assert await loop.call(asyncio.sleep, 0, "ok") == "ok"  # type: ignore[func-returns-value]
    assert loop.loop.is_closed()
    assert not loop._thread.is_alive()
    with pytest.raises(RuntimeError, match="the asyncio loop is closed"):
        await loop.call(asyncio.sleep, 0)


async def test_a_call_cancelled_before_it_starts_leaves_nothing_unawaited() -> None:
    """The coroutine is made in the asyncio task: cancelled before its first step, no
    coroutine is left 'never awaited' (warnings are errors here)."""
    ran: list[str] = []

    async def note() -> None:
        ran.append("ran")

    async with open_asyncio_thread() as loop:
        for _ in range(20):
            with trio.CancelScope() as scope:
                scope.cancel()
                await loop.call(note)
        gc.collect()
    assert len(ran) <= 20  # some may have run before the cancel; none left half-made
