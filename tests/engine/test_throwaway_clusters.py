"""Where reactor.testing makes its throwaway clusters: in RAM where there is room (a
database cloned and dropped per test costs a tenth of the CPU there), on disk
otherwise, or where REACTOR_TEST_PG_DIR says."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from reactor import testing
from reactor.engine.pgcluster import PgCluster
from tests.harness import scalar
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
    where = testing.cluster_dir() or tempfile.gettempdir()
    assert pg_cluster.base_dir.parent == Path(where).resolve()
    assert scalar(pg_cluster.url(), "SELECT setting::int FROM pg_settings "
                                    "WHERE name = 'max_wal_size'") == 256
