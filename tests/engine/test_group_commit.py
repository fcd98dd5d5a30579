"""engine.batching.GroupCommit: the jobs of one moment share one write, and each still
gets its own outcome (pure trio: the write is a function the test controls)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from reactor.engine.batching import GroupCommit


class Writes:
    """Records each batch; each write waits until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = trio.Event()
        self.fail_with: Exception | None = None

    async def write(self, items: Sequence[int]) -> str:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return f"batch of {len(items)}"


async def test_the_first_item_is_written_at_once_and_the_waiting_ones_together() -> None:
    writes = Writes()
    commit = GroupCommit(writes.write)
    results: dict[int, str] = {}

    async def submit(n: int) -> None:
        results[n] = await commit.submit(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert writes.batches == [[0]]  # no timer: item 0 did not wait for company
        for n in range(1, 5):
            nursery.start_soon(submit, n)
        await trio.testing.wait_all_tasks_blocked()
        writes.gate.set()
    assert [sorted(batch) for batch in writes.batches] == [[0], [1, 2, 3, 4]]  # any order
    assert results == {0: "batch of 1", 1: "batch of 4", 2: "batch of 4", 3: "batch of 4",
                       4: "batch of 4"}


async def test_an_error_of_the_write_reaches_every_item_of_its_batch() -> None:
    writes = Writes()
    writes.fail_with = RuntimeError("database said no")
    writes.gate.set()
    commit = GroupCommit(writes.write)
    errors: list[str] = []

    async def submit(n: int) -> None:
        with pytest.raises(RuntimeError) as caught:
            await commit.submit(n)
        errors.append(str(caught.value))

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(submit, n)
    assert errors == ["database said no"] * 3
    writes.fail_with = None
    assert await commit.submit(9) == "batch of 1"  # nothing of the failed batch is left


async def test_a_writer_cut_off_hands_its_batch_to_the_next_one() -> None:
    """The writer's job is cancelled mid-write (its deadline, shutdown): the item of the
    job waiting behind it is written by the next writer, not lost; the cut one's item
    goes with its caller (written again only with keep_orphans)."""
    writes = Writes()
    commit = GroupCommit(writes.write)
    results: dict[int, str] = {}
    writer = trio.CancelScope()

    async def first() -> None:
        with writer:
            await commit.submit(0)

    async def submit(n: int) -> None:
        results[n] = await commit.submit(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()  # 0 is being written
        nursery.start_soon(submit, 1)
        await trio.testing.wait_all_tasks_blocked()  # 1 waits for the writer
        writer.cancel()                             # 0's job is cut mid-write
        await trio.testing.wait_all_tasks_blocked()
        writes.gate.set()
    assert writer.cancelled_caught
    assert [sorted(batch) for batch in writes.batches] == [[0], [1]]
    assert results == {1: "batch of 1"}


async def test_a_batch_refused_for_one_item_is_written_again_item_by_item() -> None:
    """`alone_after`: a batch whose write fails with such an error may hold one bad item:
    each item is written alone, so the bad one fails its own caller only."""
    batches: list[list[int]] = []
    gate = trio.Event()

    async def write(items: Sequence[int]) -> str:
        batches.append(sorted(items))
        await gate.wait()
        if 13 in items:
            raise ValueError("13 is refused")
        return f"batch of {len(items)}"

    commit = GroupCommit(write, alone_after=(ValueError,))
    outcomes: dict[int, str] = {}

    async def submit(n: int) -> None:
        try:
            outcomes[n] = await commit.submit(n)
        except ValueError as exc:
            outcomes[n] = f"error: {exc}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, 1)
        await trio.testing.wait_all_tasks_blocked()  # 1 is being written alone
        for n in (12, 13, 14):
            nursery.start_soon(submit, n)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert batches[:2] == [[1], [12, 13, 14]]
    assert sorted(batches[2:]) == [[12], [13], [14]]
    assert outcomes == {1: "batch of 1", 12: "batch of 1", 13: "error: 13 is refused",
                        14: "batch of 1"}


@pytest.mark.parametrize("keep_orphans", [False, True])
async def test_an_item_whose_caller_left_is_dropped_unless_orphans_are_kept(
        keep_orphans: bool) -> None:
    """A caller cancelled while it waits for the writer (its job timed out, and may be
    dead-lettered): its item is not written later by someone else's write, so a
    failed job leaves no effect behind, and waiting items do not pile up during an
    outage. With keep_orphans (a mail that went out must be recorded) it is."""
    writes = Writes()
    commit = GroupCommit(writes.write, keep_orphans=keep_orphans)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit.submit, 0)
        await trio.testing.wait_all_tasks_blocked()  # 0 is being written
        leaving = trio.CancelScope()

        async def leaves() -> None:
            with leaving:
                await commit.submit(1)

        nursery.start_soon(leaves)
        await trio.testing.wait_all_tasks_blocked()  # 1 waits for the writer
        leaving.cancel()
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(commit.submit, 2)
        await trio.testing.wait_all_tasks_blocked()
        writes.gate.set()
    assert [sorted(batch) for batch in writes.batches] == (
        [[0], [1, 2]] if keep_orphans else [[0], [2]])
