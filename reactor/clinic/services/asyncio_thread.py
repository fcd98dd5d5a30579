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
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

__all__ = ["AsyncioThread", "open_asyncio_thread"]

T = TypeVar("T")

# A cancelled asyncio task normally ends within a loop turn; past this the caller
# goes on without it (the task keeps nothing of the caller's).
CANCEL_WAIT_S = 5.0


@dataclass(eq=False)
class _Call(Generic[T]):
    """One call in flight: set `ended` (in the trio thread) once its task is done, or once
    the loop is gone without it."""

    token: trio.lowlevel.TrioToken
    ended: trio.Event = field(default_factory=trio.Event)
    task: asyncio.Task[T] | None = None

    def end(self) -> None:  # from any thread
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.ended.set)


class AsyncioThread:
    """One asyncio loop running in a daemon thread; `call` runs a coroutine there."""

    def __init__(self, name: str = "reactor-asyncio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._calls: set[_Call[Any]] = set()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Stopped, or killed by an exception that escaped a task (SystemExit…):
            # nobody waits for an answer that cannot come.
            self._closed = True
            for call in list(self._calls):
                call.end()

    def start(self) -> None:
        self._thread.start()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` on the asyncio loop; its result or its exception.

        Raises:
            RuntimeError: the loop is closed (or its thread died).
        """
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("the asyncio loop is closed")
        return await self._call(fn, *args, **kwargs)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        call: _Call[T] = _Call(trio.lowlevel.current_trio_token())

        def start() -> None:  # in the asyncio thread
            # The coroutine is made inside the task: a task cancelled before its first
            # step then leaves no coroutine that was never awaited.
            call.task = self.loop.create_task(_run(fn, args, kwargs))
            call.task.add_done_callback(lambda _: call.end())

        def cancel() -> None:  # in the asyncio thread, after start (FIFO)
            if call.task is not None:
                call.task.cancel()

        self._calls.add(call)
        try:
            try:
                self.loop.call_soon_threadsafe(start)
            except RuntimeError:  # closed meanwhile
                raise RuntimeError("the asyncio loop is closed") from None
            try:
                await call.ended.wait()
            except BaseException:
                with contextlib.suppress(RuntimeError):  # a closed loop has nothing to cancel
                    self.loop.call_soon_threadsafe(cancel)
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_WAIT_S):
                    await call.ended.wait()
                raise
        finally:
            self._calls.discard(call)
        if call.task is None or not call.task.done() or call.task.cancelled():
            # Never answered, or cancelled by aclose (not by this caller: that raised above).
            raise RuntimeError("the asyncio loop is closed")
        try:
            return call.task.result()
        except _Escaped as escaped:
            raise escaped.exc from None

    async def aclose(self) -> None:
        """Cancel the calls still running (and wait for them, bounded), let pending
        callbacks (transports closing their sockets) run, then stop the loop and join
        its thread. A caller whose call could not end is told the loop is closed."""
        if self._closed and not self._thread.is_alive():
            self._close_loop()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            pending = list(self._calls)
            for call in pending:
                task = call.task
                if task is not None:
                    with contextlib.suppress(RuntimeError):
                        self.loop.call_soon_threadsafe(task.cancel)
            with trio.move_on_after(CANCEL_WAIT_S):
                for call in pending:
                    await call.ended.wait()
                await self._call(asyncio.sleep, 0.01)
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            await trio.to_thread.run_sync(self._thread.join, CANCEL_WAIT_S)
        for call in list(self._calls):
            call.ended.set()
        self._close_loop()

    def _close_loop(self) -> None:
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class _Escaped(Exception):
    """Carries KeyboardInterrupt or SystemExit out of an asyncio task to its trio caller:
    raised as they are, they would escape run_forever and end the loop for every caller."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


async def _run(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> T:
    try:
        return await fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit) as exc:
        raise _Escaped(exc) from None


@contextlib.asynccontextmanager
async def open_asyncio_thread(name: str = "reactor-asyncio") -> AsyncIterator[AsyncioThread]:
    """An AsyncioThread for the duration of the block."""
    thread = AsyncioThread(name)
    thread.start()
    try:
        yield thread
    finally:
        await thread.aclose()
