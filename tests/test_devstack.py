"""Acceptance: `reactor dev` in a fresh directory produces mails, a PDF and live events."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from reactor.devstack import DevStack


def start(cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "reactor", "dev"], cwd=cwd, stdout=out,
                                stderr=out, env={"PATH": os.environ["PATH"]})


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a person would; the stack must exit cleanly."""
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition: object, what: str, log: Path, within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_dev_stack_demo_then_restart_reuses_the_data(tmp_path: Path) -> None:
    home = tmp_path / ".reactor"
    log = tmp_path / "dev.log"
    proc = start(tmp_path, log)
    try:
        wait_for(lambda: len(list((home / "outbox").glob("*.eml"))) >= 7, "demo mails", log)
        wait_for(lambda: list((home / "reports").glob("*/*.pdf")), "demo report", log)
        wait_for(lambda: "dashboard  http://127.0.0.1:" in log.read_text(), "banner", log)
        text = log.read_text()
        assert "job.succeeded" in text  # the command follows the live events
        assert "report_generation_queue" in text
        port = int((home / "pg-port").read_text())
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(url) as conn:
            statuses: dict[int, str] = dict(
                conn.execute("SELECT amount::int, status FROM public.payments"))
            assert statuses == {3500: "completed", 4200: "failed"}
            listen = conn.execute("SHOW listen_addresses").fetchone()
            assert listen == ("127.0.0.1",)  # never beyond loopback
    finally:
        stop(proc)

    mails = len(list((home / "outbox").glob("*.eml")))
    log2 = tmp_path / "dev2.log"
    proc = start(tmp_path, log2)
    try:
        wait_for(lambda: "demo data from last run" in log2.read_text(), "second start", log2)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM public.profiles").fetchone() == (2,)
    finally:
        stop(proc)
    assert len(list((home / "outbox").glob("*.eml"))) == mails  # nothing sent twice
    shutil.rmtree(DevStack(home).cluster_dir(), ignore_errors=True)
