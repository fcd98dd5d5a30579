"""Files written whole or not at all, and the sweep of what a crash leaves behind.

Every file the reactor writes (a report, an outbox mail, a prepared font) goes
through `write_whole` (or `write_whole_sync` outside trio): a reader sees the old
file or the new one, never half of one, and once it returns the file survives a
power loss, so a row recorded after it never points at an empty or short file.
It is what Postgres, SQLite and git do: a temp name in the same directory, the
data, fsync of the file, rename over the final name, fsync of the directory.

On any error, and on cancellation, the temp file is removed (under trio in a
shielded scope), so a full disk is not kept full by the retries. Only a crash
(kill -9, power loss) can still leave one: `sweep_temp_files` removes temp files
older than `STALE_AFTER_S`, and `swept` does so at start and every
`SWEEP_EVERY_S` for the directories an app names.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from uuid import uuid4

import structlog
import trio

__all__ = ["STALE_AFTER_S", "SWEEP_EVERY_S", "WriteFailed", "is_temp_name",
           "sweep_temp_files", "swept", "write_whole", "write_whole_sync"]

log = structlog.get_logger("reactor.files")

# A temp file untouched this long is no write in progress (a write takes well under a
# second, and keeps touching it), in this process or in another reactor sharing the
# directory: the sweep may remove it.
STALE_AFTER_S = 3600.0
SWEEP_EVERY_S = 3600.0
# The async form hands the data to a worker thread this much at a time, so that a
# cancellation lands between two chunks instead of after the whole file.
CHUNK_BYTES = 1 << 20

_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # whole name: fullmatch


class WriteFailed(OSError):
    """A file could not be written whole; nothing of it was left behind.

    `str()` names the directory and the cause ("cannot write to /srv/reports/…:
    No space left on device"); `directory` and `reason` let a caller say it in its
    own words (which setting names that directory); `errno` is the cause's.
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        self.directory = path.parent
        self.reason = cause.strerror or str(cause)
        super().__init__(f"cannot write to {self.directory}: {self.reason}")
        self.errno = cause.errno


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of write_whole's temp names (`.<name>.<32 hex>.tmp`)."""
    return _TEMP_NAME.fullmatch(name) is not None


def _temp_for(path: Path) -> Path:
    # Unique per write: two deliveries of one job may write the same file at once.
    return path.with_name(f".{path.name}.{uuid4().hex}.tmp")


def _open(temp: Path) -> int:
    _make_directory(temp.parent)
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def _make_directory(directory: Path) -> None:
    """Create `directory` and its missing parents durably: each new directory's entry is
    fsynced in its parent (Postgres' fsync_parent_path), so a family's first report
    directory does not vanish in a power loss while its row says the file is there."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_directory(new.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory (EINVAL) or refuse it on a read-only
        # descriptor (EBADF); what they keep is theirs to keep. Postgres ignores the same.
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _commit(fd: int, temp: Path, path: Path) -> None:
    """fsync and close the temp file, rename it over `path`, fsync the directory."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    _fsync_directory(path.parent)


def _discard(fd: int | None, temp: Path) -> None:
    """Close and remove the temp file; quietly (the error that brought us here is the
    one to report; a temp file that cannot be removed now is left to the sweep)."""
    if fd is not None:
        with suppress(OSError):
            os.close(fd)
    with suppress(OSError):
        temp.unlink()


def _failed(path: Path, exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
        return WriteFailed(path, exc)
    return exc


def write_whole_sync(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole and durably (creating its directory); see the module.

    Raises:
        WriteFailed: naming the directory and the cause; no temp file is left.
    """
    temp = _temp_for(path)
    fd: int | None = None
    try:
        fd = _open(temp)
        _write(fd, memoryview(data))
        opened, fd = fd, None  # _commit closes it, whatever happens
        _commit(opened, temp, path)
    except BaseException as exc:
        _discard(fd, temp)
        failed = _failed(path, exc)
        if failed is exc:
            raise
        raise failed from exc


async def write_whole(path: trio.Path | Path, data: bytes) -> None:
    """`write_whole_sync` for trio: the blocking work in worker threads, cancellable
    between chunks of CHUNK_BYTES; a cancelled write leaves no temp file and no file.

    Raises:
        WriteFailed: naming the directory and the cause; no temp file is left.
    """
    path = Path(path)
    temp = _temp_for(path)
    fd: int | None = None
    try:
        fd = await trio.to_thread.run_sync(_open, temp)
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_BYTES):
            await trio.to_thread.run_sync(_write, fd, view[start:start + CHUNK_BYTES])
        # A cancel that came during the last chunk ends the write here, while `fd` is still
        # ours to close (below). From then on the commit is shielded: once started it
        # finishes (fsync, rename), and a cancel can no longer strand an open descriptor
        # (a deleted temp file keeps its blocks while open).
        await trio.lowlevel.checkpoint_if_cancelled()
        opened, fd = fd, None  # _commit closes it, whatever happens
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_commit, opened, temp, path)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_discard, fd, temp)
        failed = _failed(path, exc)
        if failed is exc:
            raise
        raise failed from exc


def sweep_temp_files(directory: Path, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove write_whole's temp files under `directory` (and its subdirectories) not
    modified for `older_than_s`: what a crash mid-write left. Nothing else is touched;
    a missing directory is nothing to sweep. Returns how many were removed."""
    cutoff = time.time() - older_than_s
    removed, problem = 0, None

    def unreadable(exc: OSError) -> None:
        nonlocal problem
        if not isinstance(exc, FileNotFoundError):
            problem = problem or exc

    # fwalk + dir_fd: each name is removed from the directory that was listed, so a
    # subdirectory swapped for a symlink meanwhile cannot lead the sweep elsewhere.
    if not os.path.isdir(directory):
        return 0  # nothing written there yet (or not a directory: the writes will say so)
    try:
        for _root, _dirs, names, root_fd in os.fwalk(directory, onerror=unreadable):
            for name in names:
                if not is_temp_name(name):
                    continue
                try:
                    info = os.lstat(name, dir_fd=root_fd)
                    if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                        os.unlink(name, dir_fd=root_fd)
                        removed += 1
                except FileNotFoundError:
                    continue  # gone meanwhile: its writer finished or another sweep took it
                except OSError as exc:
                    problem = problem or exc
    except FileNotFoundError:
        pass  # the directory went away while being swept: nothing left to sweep
    if removed:  # a write was cut short by a crash (kill -9, power loss): worth a look
        log.warning("stale temp files removed", directory=str(directory), count=removed)
    if problem is not None:
        log.warning("cannot sweep stale temp files", directory=str(directory),
                    error=problem.strerror or str(problem))
    return removed


@asynccontextmanager
async def swept(*directories: Path, every_s: float = SWEEP_EVERY_S,
                older_than_s: float = STALE_AFTER_S) -> AsyncIterator[None]:
    """While inside: `directories` swept of stale temp files once on entry (before the
    block runs) and then every `every_s`."""
    async def sweep() -> None:
        for directory in directories:
            await trio.to_thread.run_sync(sweep_temp_files, directory, older_than_s,
                                          abandon_on_cancel=True)

    async def keep_sweeping() -> None:
        while True:
            await trio.sleep(every_s)
            await sweep()

    await sweep()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_sweeping)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
