"""The file outbox (EMAIL_PROVIDER=file) writes each .eml whole or not at all
(engine.files): a full EMAIL_OUTBOX_DIR is an outage that leaves no temp file, and
the temp files a crash left are swept at start."""

from __future__ import annotations

import email
import email.policy
import os
import time
from datetime import timedelta
from pathlib import Path

import trio

from reactor.engine.events import Event
from reactor.engine.files import STALE_AFTER_S
from tests import factories as f
from tests.harness import in_db, running_reactor, send, sql, wait_for
from tests.tmpfs import fill, temp_files, tmpfs


async def test_a_full_outbox_is_retried_leaves_no_temp_and_the_mail_follows(
        database_url: str, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "outbox") as outbox:
        filler = fill(outbox)
        async with running_reactor(database_url, EMAIL_PROVIDER="file",
                                   EMAIL_OUTBOX_DIR=str(outbox)) as reactor:
            with reactor.bus.subscribe() as sub:
                await in_db(database_url, lambda c: f.appointment(
                    c, f.profile(c, email="b@example.com", full_name="Борис", locale="ru"),
                    starts_in=timedelta(days=2), specialist_name="Dr. X"))
                await send(database_url, "analytics_queue", {"event": "during_full_outbox"})
                retries: list[Event] = []
                flowed: set[str] = set()
                with trio.fail_after(60):
                    async for event in sub.receive:
                        if event["type"] == "job.retrying" and event["queue"] == "email_queue":
                            retries.append(event)
                        elif event["type"] == "job.succeeded":
                            flowed.add(event["queue"])
                        if len(retries) >= 2 and "analytics_queue" in flowed:
                            break
                assert "email_queue" not in flowed
                assert {e["error"] for e in retries} == {
                    f"RetryableError: cannot write to EMAIL_OUTBOX_DIR ({outbox}): "
                    "No space left on device"}
                assert temp_files(outbox) == []
                assert await sql(database_url, "SELECT status FROM public.email_ledger") == [
                    ("failed",)]
                filler.unlink()
                await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                               and e["queue"] == "email_queue", within_s=60)
        [path] = list(outbox.iterdir())  # the mail, and no temp file
        mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert mail["To"] == "b@example.com"
        # The ledger says 'sent' for the file that is there (written before it said so).
        assert await sql(database_url, "SELECT status, message_id FROM public.email_ledger"
                         ) == [("sent", mail["Message-ID"])]


async def test_stale_temp_files_in_the_outbox_are_swept_at_start(
        database_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    stale, fresh = outbox / f".a.eml.{'ab' * 16}.tmp", outbox / f".b.eml.{'cd' * 16}.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"From: cut short")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    async with running_reactor(database_url, EMAIL_PROVIDER="file",
                               EMAIL_OUTBOX_DIR=str(outbox)):
        assert sorted(p.name for p in outbox.iterdir()) == [fresh.name]
