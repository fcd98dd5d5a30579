"""The dashboard in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from reactor.pgcluster import free_port
from tests.harness import wait_healthy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")


def test_dashboard_shows_a_message_enqueued_after_the_page_loaded(
        database_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    feed_port, http_port = free_port(), free_port()
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": database_url, "EMAIL_PROVIDER": "file",
           "EMAIL_OUTBOX_DIR": str(tmp_path / "outbox"), "FEED_PORT": str(feed_port),
           "METRICS_PORT": str(http_port), "LOG_FORMAT": "json", "MAX_ATTEMPTS": "1"}
    log = (tmp_path / "reactor.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "reactor", "run"], env=env, stdout=log,
                            stderr=log, cwd=tmp_path)
    try:
        wait_healthy(http_port, proc, tmp_path / "reactor.log")
        # Playwright's sync API runs an asyncio loop of its own; trio-asyncio (the SMTP
        # tests) leaves its policy installed for the whole process, so restore the default.
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{http_port}/")
            expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
            with psycopg.connect(database_url, autocommit=True) as conn:
                user = conn.execute("INSERT INTO public.profiles (email, full_name, locale) "
                                    "VALUES ('anna@example.com', 'Анна', 'ru') RETURNING id"
                                    ).fetchone()
                assert user is not None
                # A consultation booked: its confirmation flows through email_queue.
                conn.execute("INSERT INTO public.appointments (user_id, specialist_name, "
                             "scheduled_at) VALUES (%s, 'Dr. X', now() + interval '2 days')",
                             (user[0],))
                [(bad,)] = conn.execute("SELECT pgmq.send('email_queue', "
                                        "'{\"to\": \"x@example.com\", \"template\": \"nope\"}')"
                                        ).fetchall()
                conn.execute("SELECT pg_notify('reactor_wakeup', 'email_queue')")
            done = page.locator('#events li[data-type="job.succeeded"][data-queue="email_queue"]')
            expect(done.first).to_be_visible(timeout=2_000)
            failure = page.locator(f'#failures tr[data-msg-id="{bad}"]')
            expect(failure).to_contain_text("unknown template 'nope'", timeout=2_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
