"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

The screenshot of the dashboard after a restart is kept in `test-artifacts/`
(git-ignored) for a human to look at.
"""

from __future__ import annotations

import shutil
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.harness import CHECKOUT, ports, reactor_process, wait_healthy, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = CHECKOUT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")]


@contextmanager
def reactor_running(database_url: str, tmp_path: Path, name: str,
                    **env: str) -> Iterator[tuple[int, int]]:
    """`reactor run` in a subprocess (tests/harness.py); yields the (feed, HTTP) ports it
    bound; SIGTERM on exit."""
    log = tmp_path / f"{name}.log"
    with reactor_process(database_url, log, MAX_ATTEMPTS="1", **env) as proc:
        bound = ports(proc, log)
        wait_healthy(bound.http, proc, log)
        yield bound.feed, bound.http
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def static_site(directory: Path) -> Iterator[int]:
    """A stranger's web site: http.server on a port the kernel chose; yields the port."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.fixture
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_the_dashboard_tells_what_happened_before_a_restart(
        database_url: str, tmp_path: Path, chromium: Any) -> None:
    from playwright.sync_api import expect

    mail = {"subject": "Hi", "variables": {"full_name": "Anna", "assessment_id": "a1"},
            "locale": "en", "to": "anna.petrova@gmail.com"}
    with reactor_running(database_url, tmp_path, "first"), \
            psycopg.connect(database_url, autocommit=True) as conn:
        def send(queue: str, body: dict[str, Any]) -> int:
            [(msg_id,)] = conn.execute("SELECT public.enqueue(%s, %s)",
                                       (queue, Jsonb(body))).fetchall()
            return int(msg_id)

        for i in range(3):
            send("analytics_queue", {"event": f"signup {i}"})
        bad = send("analytics_queue", {"no_event": True})
        send("email_queue", {**mail, "template": "checkup_completed"})
        bad_mail = send("email_queue", {**mail, "template": "nope"})

        def settled() -> bool:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM pgmq.q_analytics_queue)"
                " + (SELECT count(*) FROM pgmq.q_email_queue),"
                " (SELECT count(*) FROM pgmq.q_analytics_queue_dlq)"
                " + (SELECT count(*) FROM pgmq.q_email_queue_dlq)").fetchone()
            return row == (0, 2)
        wait_until(settled, what="every message to succeed or be dead-lettered")

    # A new reactor, a page opened afterwards: everything comes from the database.
    with reactor_running(database_url, tmp_path, "second") as (_, http_port):
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{http_port}/")
        expect(page.locator("#conn")).to_have_text("live", timeout=60_000)
        expect(page.get_by_test_id("done-analytics_queue")).to_have_text("3 done")
        expect(page.get_by_test_id("dead-analytics_queue")).to_have_text("1 dead-lettered")
        expect(page.get_by_test_id("done-email_queue")).to_have_text("1 done")
        expect(page.get_by_test_id("dead-email_queue")).to_have_text("1 dead-lettered")
        expect(page.get_by_test_id("chart-analytics_queue")).to_have_attribute("data-total", "3")
        expect(page.get_by_test_id("chart-email_queue")).to_have_attribute("data-total", "1")
        failure = page.locator(f'#failures tr[data-queue="analytics_queue"][data-msg-id="{bad}"]')
        expect(failure).to_contain_text("event: Field required")
        expect(failure).to_contain_text(f"msg #{bad} → dlq #")
        expect(failure).to_contain_text("dead-lettered")
        mail_failure = page.locator(f'#failures tr[data-queue="email_queue"]'
                                    f'[data-msg-id="{bad_mail}"]')
        expect(mail_failure).to_contain_text("unknown template 'nope'")
        letter = page.locator(f'#dlq tr[data-msg-id="{bad}"]')
        expect(letter).to_contain_text(f"msg #{bad}")
        expect(letter).to_contain_text("dlq #")
        assert "anna.petrova" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    # The whole page, as wide as the window (a broken or empty capture is not).
    head = (ARTIFACTS / "dashboard.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width == 1400
    assert height >= 1000


EVIL_PAGE = """<!doctype html><html><body><script>
window.result = {messages: 0, closed: false, fetched: null};
const ws = new WebSocket("ws://127.0.0.1:FEED/events?replay=200");
ws.onmessage = () => { window.result.messages += 1; };
ws.onclose = () => { window.result.closed = true; };
fetch("http://127.0.0.1:HTTP/api/ticket", {method: "POST", credentials: "include"})
  .then(r => r.text()).then(t => { window.result.fetched = t; })
  .catch(e => { window.result.fetched = "blocked: " + e; });
</script></body></html>"""


def test_a_foreign_page_cannot_read_the_feed_and_the_dashboard_signs_in(
        database_url: str, tmp_path: Path, chromium: Any) -> None:
    from playwright.sync_api import expect

    token = "dashboard-token-1234567890"
    site = tmp_path / "evil"
    site.mkdir()
    with reactor_running(database_url, tmp_path, "token", FEED_TOKEN=token) as (
            feed_port, http_port):
        # The operator signs in once; the token never appears in a URL.
        page = chromium.new_page()
        page.goto(f"http://127.0.0.1:{http_port}/")
        expect(page.locator("#signin")).to_be_visible()
        page.fill("#token", "wrong")
        page.click("#signin button")
        expect(page.locator("#signin-error")).to_contain_text("wrong token")
        page.fill("#token", token)
        page.click("#signin button")
        expect(page.locator("#conn")).to_have_text("live", timeout=60_000)
        assert token not in page.url
        # A stranger's page, opened in the same (signed-in) browser.
        (site / "index.html").write_text(EVIL_PAGE.replace("FEED", str(feed_port))
                                         .replace("HTTP", str(http_port)))
        with static_site(site) as evil_port:
            evil = chromium.new_page()
            evil.goto(f"http://127.0.0.1:{evil_port}/index.html")
            evil.wait_for_function("window.result.closed && window.result.fetched !== null",
                                   timeout=60_000)
            result = evil.evaluate("window.result")
    assert result["messages"] == 0
    assert result["fetched"].startswith("blocked")

