"""Where reactor.testing makes its throwaway clusters: in RAM where there is room (a
database cloned and dropped per test costs a tenth of the CPU there), on disk
otherwise, or where REACTOR_TEST_PG_DIR says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from reactor import testing
from reactor.engine.pgcluster import PgCluster
from tests.harness import read_line, scalar
from tests.tmpfs import tmpfs


def test_a_roomy_tmpfs_is_chosen_and_a_small_one_or_a_disk_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(testing.PG_DIR_VAR, raising=False)
    with tmpfs(tmp_path / "roomy", size="3g") as roomy:  # a limit, not an allocation
        monkeypatch.setattr(testing, "RAM_DIR", str(roomy))
        assert testing.cluster_dir() == str(roomy)
    with tmpfs(tmp_path / "small", size="64m") as small:
        monkeypatch.setattr(testing, "RAM_DIR", str(small))
        assert testing.cluster_dir() is None
    monkeypatch.setattr(testing, "RAM_DIR", str(tmp_path / "absent"))
    assert testing.cluster_dir() is None
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setattr(testing, "RAM_DIR", str(plain))  # not a mount point of a tmpfs
    assert testing.cluster_dir() is None


def test_the_variable_chooses_and_a_wrong_one_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(testing.PG_DIR_VAR, str(tmp_path))
    assert testing.cluster_dir() == str(tmp_path)
    monkeypatch.setenv(testing.PG_DIR_VAR, "")
    assert testing.cluster_dir() is None  # the system temp directory
    monkeypatch.setenv(testing.PG_DIR_VAR, str(tmp_path / "missing"))
    with pytest.raises(pytest.UsageError, match=r"REACTOR_TEST_PG_DIR=.*missing.* is not a "
                                                r"directory: create it"):
        testing.cluster_dir()


def test_the_sessions_cluster_lives_there_with_its_wal_capped(pg_cluster: PgCluster) -> None:
    where = testing.session_cluster_dir() or tempfile.gettempdir()
    assert pg_cluster.base_dir.parent == Path(where).resolve()
    assert scalar(pg_cluster.url(), "SELECT setting::int FROM pg_settings "
                                    "WHERE name = 'max_wal_size'") == 256


def test_a_tmpfs_hidden_under_another_mount_or_odd_mount_names_do_not_mislead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The top mount on the path is what counts (an ext4 bind-mounted over a tmpfs is not
    RAM), and a mount point that is not UTF-8 elsewhere in the table changes nothing."""
    monkeypatch.delenv(testing.PG_DIR_VAR, raising=False)
    disk = tmp_path / "disk"
    disk.mkdir()
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/odd \xff"))
    with tmpfs(tmp_path / "ram", size="3g") as ram, tmpfs(odd, size="1m"):
        monkeypatch.setattr(testing, "RAM_DIR", str(ram))
        assert testing.cluster_dir() == str(ram)
        subprocess.run(["mount", "--bind", str(disk), str(ram)], check=True, timeout=30)
        try:
            assert testing.cluster_dir() is None
        finally:
            subprocess.run(["umount", str(ram)], check=True, timeout=30)
        assert testing.cluster_dir() == str(ram)


# What a test process killed mid-session leaves: a running server on its copy (the
# child is SIGKILLed: no atexit, no fixture teardown).
_KILLED_SESSION = """
import sys, time
from pathlib import Path
from reactor import testing
cluster = testing.throwaway_cluster(copy_of=Path(sys.argv[1]), pg_cron=False)
testing.start_on_a_free_port(cluster)
print(cluster.base_dir, cluster.port, flush=True)
time.sleep(600)
"""


def test_the_clusters_of_a_killed_session_are_stopped_and_removed_by_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In RAM, what a killed run left would stay until reboot: the next session stops
    its servers and removes its directories. Never a live session's, one being made, or
    what a planted link points to."""
    where = Path(tempfile.mkdtemp(prefix="sweep-", dir=testing.session_cluster_dir()))
    where.chmod(0o755)  # the server user enters it
    monkeypatch.setenv(testing.PG_DIR_VAR, str(where))
    initdb = testing._initdb_outputs.data_dir("postgres")  # the child copies it
    with subprocess.Popen([sys.executable, "-c", _KILLED_SESSION, str(initdb)],
                          stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": "."}
                          ) as child:
        try:
            base, port = read_line(child.stdout).split()  # type: ignore[arg-type]
        finally:
            child.kill()
    orphan = PgCluster(Path(base), int(port), pg_cron=False)
    assert orphan.running()
    live = Path(tempfile.mkdtemp(prefix="reactor-test-live-", dir=where))
    testing._claim(live)  # this process holds it
    elsewhere = Path(tempfile.mkdtemp(prefix="target-", dir=where))
    (elsewhere / ".reactor-owner.lock").touch()
    (where / "reactor-test-link").symlink_to(elsewhere)
    try:
        testing._sweep_orphans(str(where))
        assert orphan.base_dir.exists(), "an orphan made an instant ago could be in the making"
        old = time.time() - 2 * testing.ORPHAN_AGE_S
        for made in (orphan.base_dir, live, elsewhere):
            os.utime(made / ".reactor-owner.lock", (old, old))
        testing._sweep_orphans(str(where))
        assert not orphan.base_dir.exists()
        assert not orphan.running()
        assert live.exists()
        assert elsewhere.exists()
    finally:
        orphan.remove()
        shutil.rmtree(where, ignore_errors=True)
