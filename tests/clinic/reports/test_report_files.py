"""Report files are written whole or not at all (engine.files), on real filesystems:
a full REPORTS_DIR, one made read-only mid-run, a shutdown in the middle of a write,
and the temp files a crash left, swept at start."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import time
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
import trio
from pypdf import PdfReader

from reactor.clinic.services.pdf import find_fonts, prepare_fonts
from reactor.engine.events import Event, Subscription
from reactor.engine.files import STALE_AFTER_S, WriteFailed
from tests import factories as f
from tests.harness import (
    log_lines,
    reactor_process,
    running_reactor,
    send,
    sql,
    wait_for,
    wait_until,
)
from tests.tmpfs import fill, remount, temp_files, tmpfs

RESULTS = {
    "child_name": "Маша Петрова",
    "scores": [{"domain": "Поведение", "score": 5, "max": 20, "band": "low"}],
    "summary": "Всё хорошо.", "recommendations": ["Ежедневные прогулки."],
}
REPORTS = "report_generation_queue"


def checkup(url: str) -> tuple[UUID, UUID]:
    """A checkup about to be completed (completing it queues the report)."""
    with psycopg.connect(url, autocommit=True) as conn:
        user = f.profile(conn)
        return user, f.assessment(conn, user, results=RESULTS)


async def complete(url: str, assessment: UUID) -> None:
    await sql(url, "UPDATE public.assessments SET status = 'completed' WHERE id = %s",
              (assessment,))


async def assert_recorded_as_written(url: str, reports: Path, user: UUID,
                                     assessment: UUID) -> None:
    """The row's size and sha256 are those of the file read back, a PDF of the child."""
    data = (reports / str(user) / f"{assessment}.pdf").read_bytes()
    [(path, size, sha)] = await sql(url, "SELECT path, bytes, sha256 FROM public.reports "
                                         "WHERE assessment_id = %s", (assessment,))
    assert (path, size, sha) == (f"{user}/{assessment}.pdf", len(data),
                                 hashlib.sha256(data).hexdigest())
    reader = PdfReader(io.BytesIO(data))
    assert "Маша Петрова" in " ".join(page.extract_text() for page in reader.pages)


async def report_retries(sub: Subscription, count: int) -> list[Event]:
    return await wait_for(sub, lambda e: e["type"] == "job.retrying" and e["queue"] == REPORTS,
                          count=count, within_s=60)


async def test_a_full_reports_dir_is_retried_leaves_no_temp_and_the_report_follows(
        database_url: str, tmp_path: Path) -> None:
    """The scenario of issue 32: REPORTS_DIR on a 300 KB tmpfs, full."""
    user, assessment = checkup(database_url)
    with tmpfs(tmp_path / "reports") as reports:
        filler = fill(reports, leave=8192)  # a temp file can start, never finish
        async with running_reactor(database_url, REPORTS_DIR=str(reports),
                                   EMAIL_OUTBOX_DIR=str(tmp_path / "outbox")) as reactor:
            with reactor.bus.subscribe() as sub:
                await complete(database_url, assessment)
                # The other queues flow meanwhile: the trigger's "checkup completed" mail
                # and an analytics event.
                await send(database_url, "analytics_queue", {"event": "during_full_disk"})
                retries: list[Event] = []
                flowed: set[str] = set()
                with trio.fail_after(60):
                    async for event in sub.receive:
                        if event["type"] == "job.retrying" and event["queue"] == REPORTS:
                            retries.append(event)
                        elif event["type"] == "job.succeeded":
                            flowed.add(event["queue"])
                        if len(retries) >= 2 and {"email_queue", "analytics_queue"} <= flowed:
                            break
                assert REPORTS not in flowed
                assert {e["error"] for e in retries} == {
                    f"RetryableError: cannot write to REPORTS_DIR ({reports / str(user)}): "
                    "No space left on device"}
                assert temp_files(reports) == []  # each attempt removed its partial file
                assert await sql(database_url, "SELECT count(*) FROM public.reports") == [(0,)]
                filler.unlink()  # space freed: the next retry writes the report
                await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                               and e["queue"] == REPORTS, within_s=60)
        assert temp_files(reports) == []
        assert [p.name for p in (reports / str(user)).iterdir()] == [f"{assessment}.pdf"]
        await assert_recorded_as_written(database_url, reports, user, assessment)


async def test_a_reports_dir_made_read_only_mid_run_is_retried_then_written(
        database_url: str, tmp_path: Path) -> None:
    first_user, first = checkup(database_url)
    second_user, second = checkup(database_url)
    with tmpfs(tmp_path / "reports", size="2m") as reports:
        async with running_reactor(database_url, REPORTS_DIR=str(reports),
                                   EMAIL_OUTBOX_DIR=str(tmp_path / "outbox")) as reactor:
            with reactor.bus.subscribe() as sub:
                await complete(database_url, first)
                await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                               and e["queue"] == REPORTS, within_s=30)
                remount(reports, read_only=True)
                try:
                    await complete(database_url, second)
                    [retry] = await report_retries(sub, 1)
                finally:
                    remount(reports, read_only=False)
                assert retry["error"] == (f"RetryableError: cannot write to REPORTS_DIR "
                                          f"({reports / str(second_user)}): "
                                          "Read-only file system")
                await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                               and e["queue"] == REPORTS, within_s=60)
        assert temp_files(reports) == []
        await assert_recorded_as_written(database_url, reports, first_user, first)
        await assert_recorded_as_written(database_url, reports, second_user, second)


async def test_stale_temp_files_are_swept_at_start_and_fresh_ones_kept(
        database_url: str, tmp_path: Path) -> None:
    """What a crash mid-write left (older than STALE_AFTER_S) goes at start; a temp file
    that may be another reactor's write in progress stays."""
    reports = tmp_path / "reports"
    old = time.time() - STALE_AFTER_S - 60
    stale = reports / "u1" / f".a.pdf.{'ab' * 16}.tmp"
    fresh = reports / "u1" / f".b.pdf.{'cd' * 16}.tmp"
    for path in (stale, fresh):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%PDF-1.3 cut short")
    os.utime(stale, (old, old))
    async with running_reactor(database_url, REPORTS_DIR=str(reports)):
        assert not stale.exists()
        assert fresh.exists()


SLOW_REPORT_WRITE = """
import os, runpy, sys, time
from pathlib import Path
import reactor.engine.files as files
# A slow disk under REPORTS_DIR: a report's write, once its first chunk is in the temp
# file, goes on only when the test creates RELEASE (after its two SIGTERMs).
reports, release = Path(os.environ["REPORTS_DIR"]), Path(os.environ["RELEASE"])
started = Path(os.environ["STARTED"])
real_open, real_write, slow = files._open, files._write, set()
def slow_open(temp):
    fd = real_open(temp)
    if reports in temp.parents:
        slow.add(fd)
    return fd
def slow_write(fd, data):
    real_write(fd, data)
    if fd in slow:
        slow.discard(fd)
        started.touch()
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
files._open, files._write = slow_open, slow_write
sys.argv = ["reactor", "run"]
runpy.run_module("reactor", run_name="__main__")
"""


@pytest.mark.process
def test_sigterm_during_a_report_write_leaves_no_temp_file_and_no_row(
        database_url: str, tmp_path: Path) -> None:
    """SIGTERM twice (the second cancels jobs at once) while the PDF is half written:
    the process exits 0, the temp file is gone, no file and no row, and the message is
    visible again for the next reactor."""
    user, assessment = checkup(database_url)
    reports, log = tmp_path / "reports", tmp_path / "r.log"
    started, release = tmp_path / "started", tmp_path / "release"
    with reactor_process(database_url, log, python_c=SLOW_REPORT_WRITE,
                         REPORTS_DIR=str(reports), STARTED=str(started),
                         RELEASE=str(release),
                         SHUTDOWN_GRACE_S="600", VISIBILITY_TIMEOUT_S="900") as proc:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE public.assessments SET status = 'completed' WHERE id = %s",
                         (assessment,))
        wait_until(started.exists, within_s=60, what="the report's write")
        [temp] = temp_files(reports)  # half written
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "reactor.stopping" in log.read_text(), what="the graceful stop")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: [e.get("event") for e in log_lines(log)].count(
            "signal received") == 2, what="the second SIGTERM")
        release.touch()  # the disk answers again; the job is cancelled by then
        assert proc.wait(timeout=60) == 0
    assert not temp.exists()
    assert temp_files(reports) == []
    assert not (reports / str(user) / f"{assessment}.pdf").exists()
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM public.reports").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pgmq.q_report_generation_queue WHERE "
                            "read_ct = 1 AND vt <= clock_timestamp()").fetchone() == (1,)
    report = [e.get("event") for e in log_lines(log)
              if e.get("queue") == REPORTS and "msg_id" in e]
    assert "job.succeeded" not in report



def test_a_font_cache_on_a_full_disk_fails_naming_it_and_leaves_no_temp_file(
        tmp_path: Path) -> None:
    """The prepared fonts go through the same helper: a full disk is one clear error,
    no partial subset is left to be loaded next time, and the next start prepares them."""
    dejavu = find_fonts(Path("/usr/share/fonts/truetype/dejavu"))
    with tmpfs(tmp_path / "fonts") as cache:
        filler = fill(cache)
        with pytest.raises(WriteFailed, match=f"^cannot write to {cache}: No space left"):
            prepare_fonts(dejavu, cache)
        assert list(cache.iterdir()) == [filler]
        filler.unlink()
        prepared = prepare_fonts(dejavu, cache)
        assert sorted(cache.iterdir()) == sorted([prepared.regular, prepared.bold])


def test_the_font_cache_is_this_users_alone(tmp_path: Path) -> None:
    """Every report embeds the prepared fonts: a cache directory another user made first,
    or one others may write, is not used (a shared /tmp outside systemd's PrivateTmp)."""
    from reactor.clinic.services.pdf import private_cache_dir

    mine = private_cache_dir(tmp_path)
    assert mine == tmp_path / f"reactor-fonts-{os.getuid()}"
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    mine.chmod(0o777)  # as if someone else had made it for us
    fresh = private_cache_dir(tmp_path)
    assert fresh != mine
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
