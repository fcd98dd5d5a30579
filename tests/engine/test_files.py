"""engine.files: a file is written whole or not at all, on real filesystems (a full
tmpfs, one remounted read-only, a write cancelled halfway), and the sweep removes
only what a crash left."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from reactor.engine import files
from reactor.engine.files import WriteFailed, sweep_temp_files, swept, write_whole
from tests.tmpfs import fill, remount, temp_files, tmpfs

OLD, NEW = b"old report\n", os.urandom(64 * 1024)


async def sync_form(path: Path, data: bytes) -> None:
    files.write_whole_sync(path, data)


FORMS: list[Callable[[Path, bytes], Awaitable[None]]] = [write_whole, sync_form]


@pytest.mark.parametrize("write", FORMS, ids=["async", "sync"])
async def test_a_file_is_written_whole_in_a_directory_made_for_it(
        tmp_path: Path, write: Callable[[Path, bytes], Awaitable[None]]) -> None:
    target = tmp_path / "user" / "report.pdf"
    await write(target, OLD)
    await write(target, NEW)  # replaces the old one
    assert target.read_bytes() == NEW
    assert [p.name for p in target.parent.iterdir()] == ["report.pdf"]


@pytest.mark.parametrize("write", FORMS, ids=["async", "sync"])
async def test_a_full_disk_fails_naming_the_directory_and_leaves_no_temp_file(
        tmp_path: Path, write: Callable[[Path, bytes], Awaitable[None]]) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        target = disk / "report.pdf"
        await write(target, OLD)
        filler = fill(disk, leave=8192)  # room for a partial temp file, not the whole
        for _ in range(3):  # retries on a full disk do not fill it further
            with pytest.raises(WriteFailed) as failed:
                await write(target, NEW)
            assert str(failed.value) == f"cannot write to {disk}: No space left on device"
            assert failed.value.errno == errno.ENOSPC
            assert (failed.value.directory, failed.value.reason) == (
                disk, "No space left on device")
            assert temp_files(disk) == []
            assert target.read_bytes() == OLD  # the old file, never half of the new
        filler.unlink()
        await write(target, NEW)
        assert target.read_bytes() == NEW
        assert sorted(p.name for p in disk.iterdir()) == ["report.pdf"]


@pytest.mark.parametrize("write", FORMS, ids=["async", "sync"])
async def test_a_directory_made_read_only_mid_run_fails_then_recovers(
        tmp_path: Path, write: Callable[[Path, bytes], Awaitable[None]]) -> None:
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        await write(disk / "a.pdf", OLD)
        remount(disk, read_only=True)
        try:
            with pytest.raises(WriteFailed,
                               match=f"^cannot write to {disk}: Read-only file system$"):
                await write(disk / "b.pdf", NEW)
        finally:
            remount(disk, read_only=False)
        assert temp_files(disk) == []
        await write(disk / "b.pdf", NEW)
        assert sorted(p.name for p in disk.iterdir()) == ["a.pdf", "b.pdf"]
        assert (disk / "b.pdf").read_bytes() == NEW


async def test_a_write_cancelled_halfway_leaves_no_temp_file_and_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled after its first chunk of a 32 MiB write (a job's timeout, or shutdown):
    the rest is not written, the temp file is removed, the old file is untouched."""
    chunks: list[int] = []
    real_write = files._write
    scope = trio.CancelScope()

    def write_then_cancel(fd: int, data: memoryview) -> None:
        real_write(fd, data)
        chunks.append(len(data))
        if len(chunks) == 1:
            assert temp_files(tmp_path) != []  # the temp file exists, half written
            trio.from_thread.run_sync(scope.cancel)

    target = tmp_path / "big.bin"
    files.write_whole_sync(target, OLD)
    monkeypatch.setattr(files, "_write", write_then_cancel)
    with scope:
        await write_whole(target, os.urandom(32 * files.CHUNK_BYTES))
    assert scope.cancelled_caught
    assert chunks == [files.CHUNK_BYTES]  # stopped at the next chunk, not the whole file
    assert temp_files(tmp_path) == []
    assert target.read_bytes() == OLD


def test_a_sync_write_interrupted_leaves_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupt (SIGINT) in the middle of the sync form: cleaned up too."""
    def interrupted(fd: int, data: memoryview) -> None:
        os.write(fd, data[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_whole_sync(tmp_path / "x.pdf", NEW)
    assert list(tmp_path.iterdir()) == []


def stale(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_the_sweep_removes_only_stale_temp_files_in_every_subdirectory(tmp_path: Path) -> None:
    hour = files.STALE_AFTER_S
    gone = [stale(tmp_path / f"u{i}" / f".r.pdf.{'ab' * 16}.tmp", hour + 60) for i in range(3)]
    kept = [
        stale(tmp_path / "u0" / f".r.pdf.{'cd' * 16}.tmp", hour - 60),  # a write in progress
        stale(tmp_path / "u0" / ".notes.tmp", 10 * hour),       # not one of our temp names
        stale(tmp_path / "u0" / "r.pdf", 10 * hour),            # a report, however old
        stale(tmp_path / f".r.pdf.{'ef' * 16}.tmp" / "inside", 10 * hour),  # a directory
    ]
    with capture_logs() as logs:
        assert sweep_temp_files(tmp_path) == 3
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept)
    assert [(e["event"], e["count"]) for e in logs] == [("stale temp files removed", 3)]
    assert sweep_temp_files(tmp_path / "not-created-yet") == 0


def test_a_sweep_that_cannot_remove_says_so_and_goes_on(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        temp = stale(disk / f".r.pdf.{'ab' * 16}.tmp", 2 * files.STALE_AFTER_S)
        remount(disk, read_only=True)
        try:
            with capture_logs() as logs:
                assert sweep_temp_files(disk) == 0
        finally:
            remount(disk, read_only=False)
        assert temp.exists()
        assert [(e["event"], e["error"]) for e in logs] == [
            ("cannot sweep stale temp files", "Read-only file system")]


async def test_swept_sweeps_before_the_block_runs(tmp_path: Path) -> None:
    temp = stale(tmp_path / "u" / f".r.pdf.{'ab' * 16}.tmp", 2 * files.STALE_AFTER_S)
    async with swept(tmp_path, tmp_path / "missing"):
        assert not temp.exists()


def open_descriptors_on(directory: Path) -> list[str]:
    """What this process holds open under `directory` (deleted files included)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


async def test_a_cancel_after_the_last_chunk_leaks_no_descriptor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel (SIGTERM's grace, a job timeout) landing during the last chunk: the write
    ends before its commit, the old file stays, and nothing stays open — a deleted temp
    file held open would keep its blocks on a full disk."""
    real_write = files._write
    scope = trio.CancelScope()

    def write_then_cancel(fd: int, data: memoryview) -> None:
        real_write(fd, data)
        trio.from_thread.run_sync(scope.cancel)

    (tmp_path / "report.pdf").write_bytes(OLD)
    monkeypatch.setattr(files, "_write", write_then_cancel)
    for _ in range(3):
        scope = trio.CancelScope()
        with scope:
            await write_whole(tmp_path / "report.pdf", NEW)
        assert scope.cancelled_caught
    assert open_descriptors_on(tmp_path) == []
    assert temp_files(tmp_path) == []
    assert (tmp_path / "report.pdf").read_bytes() == OLD


@pytest.mark.parametrize("write", FORMS, ids=["async", "sync"])
async def test_new_directories_are_made_durable_in_their_parents(
        tmp_path: Path, write: Callable[[Path, bytes], Awaitable[None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A family's first report creates its directory: the new entry is fsynced in the
    parent (REPORTS_DIR), not only the file in the new directory."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    await write(tmp_path / "family" / "child" / "report.pdf", NEW)
    directories = [p for p in synced if not p.endswith((".tmp", ".pdf"))]
    assert directories == [str(tmp_path), str(tmp_path / "family"),
                           str(tmp_path / "family" / "child")]


async def test_a_filesystem_that_cannot_fsync_a_directory_still_takes_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL from a directory's fsync (some filesystems) is not a failed write: the file
    is renamed into place already, and a retry would write it again (a second mail in
    the outbox)."""
    real_fsync = os.fsync

    def no_directory_fsync(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_directory_fsync)
    await write_whole(tmp_path / "new" / "mail.eml", NEW)
    assert (tmp_path / "new" / "mail.eml").read_bytes() == NEW


def test_a_temp_name_is_matched_whole() -> None:
    assert files.is_temp_name(".report.pdf." + "a" * 32 + ".tmp")
    assert not files.is_temp_name(".report.pdf." + "a" * 32 + ".tmp\n")
    assert not files.is_temp_name("report.pdf")
