"""An asyncio event loop in a thread of its own, for the one asyncio library the
reactor uses (aiosmtplib), driven from trio.

Why not trio-asyncio: it runs asyncio's callbacks inside trio's loop at a cost of
~1 ms of CPU per mail (more than the whole conversation costs aiosmtplib on a
plain loop), and it changes asyncio for the whole process. Here asyncio keeps
its own loop in one daemon thread; a trio task hands it a coroutine and sleeps
until the result comes back (two wake-ups per call, ~0.15 ms).

Cancellation crosses over: a cancelled trio caller cancels the asyncio task and
waits (shielded, bounded by `CANCEL_WAIT_S`) until it has really ended, so
whatever the task held (a socket mid-conversation) is in a known state when
the caller's cleanup runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

__all__ = ["AsyncioThread", "open_asyncio_thread"]

T = TypeVar("T")

# A cancelled asyncio task normally ends within a loop turn; past this the caller
# goes on without it (the task keeps nothing of the caller's).
CANCEL_WAIT_S = 5.0


class AsyncioThread:
    """One asyncio loop running in a daemon thread; `call` runs a coroutine there."""

    def __init__(self, name: str = "reactor-asyncio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` on the asyncio loop; its result or its exception.

        Raises:
            RuntimeError: the loop is closed.
        """
        if self._closed:
            raise RuntimeError("the asyncio loop is closed")
        return await self._call(fn, *args, **kwargs)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        token = trio.lowlevel.current_trio_token()
        ended = trio.Event()
        tasks: list[asyncio.Task[T]] = []

        def signal_end(_: asyncio.Task[T]) -> None:  # in the asyncio thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(ended.set)

        def start() -> None:  # in the asyncio thread
            # The coroutine is made inside the task: a task cancelled before its first
            # step then leaves no coroutine that was never awaited.
            task = self.loop.create_task(_run(fn, args, kwargs))
            task.add_done_callback(signal_end)
            tasks.append(task)

        def cancel() -> None:  # in the asyncio thread, after start (FIFO)
            tasks[0].cancel()

        self.loop.call_soon_threadsafe(start)
        try:
            await ended.wait()
        except BaseException:
            self.loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_WAIT_S):
                await ended.wait()
            raise
        return tasks[0].result()

    async def aclose(self) -> None:
        """Let pending callbacks (transports closing their sockets) run, then stop the
        loop and join its thread."""
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            self.loop.close()
            return
        with trio.CancelScope(shield=True):
            await self._call(asyncio.sleep, 0.01)
            self.loop.call_soon_threadsafe(self.loop.stop)
            await trio.to_thread.run_sync(self._thread.join, CANCEL_WAIT_S)
        if not self._thread.is_alive():
            self.loop.close()


async def _run(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> T:
    return await fn(*args, **kwargs)


@contextlib.asynccontextmanager
async def open_asyncio_thread(name: str = "reactor-asyncio") -> AsyncIterator[AsyncioThread]:
    """An AsyncioThread for the duration of the block."""
    thread = AsyncioThread(name)
    thread.start()
    try:
        yield thread
    finally:
        await thread.aclose()
