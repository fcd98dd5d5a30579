"""The suite's `reactor ...` commands run as forks of a warm interpreter
(tests/warm_start.py): a fork must be what `python -m reactor ARGS` would have been."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import warm_start

ROOT = str(Path(__file__).resolve().parents[2])
PROBE = "tests.engine.warm_probe"


def cold(module: str, args: list[str], env: dict[str, str],
         cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, check=False, timeout=120,
                          stdin=subprocess.DEVNULL)


def warm(module: str, args: list[str], env: dict[str, str],
         cwd: str) -> subprocess.CompletedProcess[str]:
    done = warm_start.WARM.run(args, env, cwd, 120, module=module)
    assert done is not None, "the warm interpreter did not start"
    return done


def test_a_warm_start_is_the_process_a_real_start_would_be() -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://x@127.0.0.1:1/db"}
    forked, real = (start(PROBE, ["3", "two words"], env, ROOT) for start in (warm, cold))
    assert forked.returncode == real.returncode == 3
    assert forked.stderr == real.stderr == "to stderr\nsecond line\n"
    # Arguments, environment (exactly), directory, empty stdin, no inherited descriptor
    # or thread, default signal handling, the same encodings, limits and umask.
    seen, expected = json.loads(forked.stdout), json.loads(real.stdout)
    assert seen.pop("random") != expected.pop("random")
    assert seen == expected
    # Two forks draw different random numbers, as two processes do.
    again = json.loads(warm(PROBE, [], env, ROOT).stdout)
    assert again["random"] != json.loads(warm(PROBE, [], env, ROOT).stdout)["random"]


def test_a_test_that_lowers_a_limit_starts_its_commands_for_real() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    assert warm_start.WARM.run([], env, ROOT, 120, module=PROBE) is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        # A fork would have the warm interpreter's limit, not the one a child inherits.
        assert warm_start.WARM.run([], env, ROOT, 120, module=PROBE) is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert warm_start.WARM.run([], env, ROOT, 120, module=PROBE) is not None


def test_a_warm_reactor_command_says_and_exits_as_a_cold_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "mysql://x@127.0.0.1/db"}
    forked, real = (start("reactor", ["run"], env, str(tmp_path)) for start in (warm, cold))
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        real.returncode, real.stdout, real.stderr)
    assert forked.returncode == 2
    assert "DATABASE_URL must be a postgresql:// URL" in forked.stderr


def test_a_warm_command_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        warm_start.WARM.run(["hang"], {"PATH": "/usr/bin:/bin"}, ROOT, 1, module=PROBE)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(("key", "warm_allowed"), [
    ("DATABASE_URL", True), ("SMTP_HOST", True), ("PGCONNECT_TIMEOUT", True),
    # Read by Python, the loader or a library before a fork could set them.
    ("PYTHONPATH", False), ("PYTHONUNBUFFERED", False), ("LANG", False), ("LC_ALL", False),
    ("TZ", False), ("LD_PRELOAD", False), ("REACTOR_HOME", False), ("NO_COLOR", False)])
def test_only_what_is_read_after_start_up_is_forked(key: str, warm_allowed: bool) -> None:
    assert warm_start.usable({"PATH": "/usr/bin", key: "x"}) is warm_allowed
