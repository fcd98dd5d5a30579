"""Real small filesystems for the tests of files written whole: a tmpfs that can be
filled, and remounted read-only and back. Needs root and mount(2): a test that
cannot mount is skipped, saying why."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False,
                          timeout=30)


@contextmanager
def tmpfs(directory: Path, size: str = "300k") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `directory` (created), unmounted on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True,
                          check=False, timeout=30).returncode != 0:
            subprocess.run(["umount", "--lazy", str(directory)], check=True, timeout=30)


def remount(directory: Path, *, read_only: bool) -> None:
    """Make the tmpfs on `directory` read-only, or writable again (root ignores mode
    bits: only the mount says no to root)."""
    done = _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(directory))
    assert done.returncode == 0, done.stderr


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of `directory` with one file, leaving about `leave` bytes
    free (in whole pages); remove the returned file to free the space."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave))
    finally:
        os.close(fd)
    return filler


def temp_files(directory: Path) -> list[Path]:
    """Every temp file left under `directory` (hidden ones included)."""
    return sorted(p for p in directory.rglob("*") if p.name.endswith(".tmp"))
