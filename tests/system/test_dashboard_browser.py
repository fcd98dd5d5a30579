"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

The screenshot of the dashboard after a restart is kept in `test-artifacts/`
(git-ignored) for a human to look at.
"""

from __future__ import annotations

import re
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

from tests.harness import (
    CHECKOUT,
    log_lines,
    ports,
    reactor_process,
    wait_healthy,
    wait_until,
)

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
        # Wait times (enqueue to start) of the first reactor's jobs, from the database:
        # every first delivery counts, the dead-lettered ones too.
        wait = page.get_by_test_id("wait-analytics_queue")
        expect(wait).to_contain_text("p50")
        expect(wait).to_contain_text("4 started")
        expect(wait).not_to_have_attribute("data-p95", "")
        expect(page.get_by_test_id("wait-email_queue")).to_contain_text("2 started")
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



# -- dead letters: inspect, replay, discard from the page ----------------------------------
def dlq_ids(conn: psycopg.Connection, queue: str) -> list[int]:
    return [int(r[0]) for r in conn.execute(
        f"SELECT msg_id FROM pgmq.q_{queue}_dlq ORDER BY msg_id").fetchall()]


def answer(asked: list[str], *, accept: bool) -> Any:
    """A handler for the page's confirm(): keeps its question, then accepts or dismisses."""
    def handle(dialog: Any) -> None:
        asked.append(dialog.message)
        if accept:
            dialog.accept()
        else:
            dialog.dismiss()
    return handle


def audit_rows(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT action, queue, dlq_ids, msg_ids, client, note "
                        "FROM reactor.dead_letter_actions ORDER BY id").fetchall()


def test_a_mail_dead_lettered_by_a_relay_outage_is_replayed_from_the_dashboard_once(
        database_url: str, tmp_path: Path, chromium: Any, smtp_server: Any) -> None:
    from playwright.sync_api import expect

    relay = smtp_server(start=False)  # its port is bound but nobody listens: the relay is down
    env = {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(relay.port),
           "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example",
           "OUTAGE_MAX_ATTEMPTS": "1"}
    mail = {"to": "anna.petrova@gmail.com", "subject": None, "template": "checkup_completed",
            "variables": {"full_name": "Anna Petrova", "assessment_id": "a1"}, "locale": "en"}
    with reactor_running(database_url, tmp_path, "relay", **env) as (_, http_port), \
            psycopg.connect(database_url, autocommit=True) as conn:
        [(msg_id,)] = conn.execute("SELECT public.enqueue('email_queue', %s)",
                                   (Jsonb(mail),)).fetchall()
        [dlq_id] = wait_until(lambda: dlq_ids(conn, "email_queue"),
                              what="the mail to be dead-lettered while the relay is down")

        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{http_port}/")
        expect(page.locator("#conn")).to_have_text("live", timeout=60_000)
        panel = page.get_by_test_id("dl-panel-email_queue")
        row = panel.locator(f'tr[data-dlq-id="{dlq_id}"]')
        expect(row).to_contain_text(f"msg #{msg_id}")
        expect(row).to_contain_text(f"dlq #{dlq_id}")
        expect(row).to_contain_text("SMTP")
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#deadletters").screenshot(path=str(ARTIFACTS / "dead-letters-panel.png"))

        page.get_by_test_id(f"dl-inspect-email_queue-{dlq_id}").click()
        dialog = page.get_by_test_id("inspect")
        expect(dialog).to_be_visible()
        expect(page.get_by_test_id("inspect-original")).to_contain_text("a***@gmail.com")
        expect(page.get_by_test_id("inspect-original")).to_contain_text("checkup_completed")
        expect(page.get_by_test_id("inspect-error")).to_contain_text("SMTP")
        assert "anna.petrova" not in page.content()
        page.screenshot(path=str(ARTIFACTS / "dead-letter-inspect.png"))

        relay.start()  # the relay is back
        page.get_by_test_id("inspect-note").fill("relay restarted")
        page.get_by_test_id("inspect-replay").click()
        expect(page.get_by_test_id("dl-status")).to_contain_text(f"replayed dlq #{dlq_id}")
        expect(dialog).to_be_hidden()
        wait_until(lambda: len(relay.mails()) == 1 and not conn.execute(
            "SELECT 1 FROM pgmq.q_email_queue").fetchall(), within_s=60,
            what="the replayed mail to be delivered")
        [(action, queue, ids, msg_ids, client, note)] = audit_rows(conn)
        assert (action, queue, ids, msg_ids, client, note) == (
            "replay", "email_queue", [dlq_id], [msg_id], "127.0.0.1", "relay restarted")

        # The same dead letter once more (a copy: as if it had been dead-lettered twice):
        # replaying a mail that was sent changes nothing, the email ledger holds.
        conn.execute("SELECT pgmq.send('email_queue_dlq', message) FROM pgmq.a_email_queue_dlq"
                     " WHERE msg_id = %s", (dlq_id,))
        page.reload()
        expect(page.locator("#conn")).to_have_text("live", timeout=60_000)
        expect(page.get_by_test_id("dl-filter-email_queue")).to_have_text(
            "filter: none (every dead letter)")
        asked: list[str] = []
        page.once("dialog", answer(asked, accept=True))
        page.get_by_test_id("dl-replay-all-email_queue").click()
        expect(page.get_by_test_id("dl-status")).to_contain_text("replayed dlq #")
        [(again,)] = conn.execute("SELECT new_msg_ids[1] FROM reactor.dead_letter_actions "
                                  "ORDER BY id DESC LIMIT 1").fetchall()
        wait_until(lambda: conn.execute("SELECT 1 FROM pgmq.a_email_queue WHERE msg_id = %s",
                                        (again,)).fetchall(), within_s=60,
                   what="the second replay to be processed")
        assert asked == ["Replay 1 dead letter: every dead letter of email_queue (no filter)?"]
        assert len(relay.mails()) == 1
        [delivered] = relay.mails()
        assert delivered["To"] == "anna.petrova@gmail.com"
    for name in ("dead-letters-panel.png", "dead-letter-inspect.png"):
        assert (ARTIFACTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# A stranger's page tries every way a page can send a request to the reactor's actions:
# fetch with JSON (needs a CORS preflight), fetch no-cors with text/plain (a "simple"
# request: it is sent, with the cookie, since another port of 127.0.0.1 is the same
# site), HTML forms (urlencoded and text/plain, the classic CSRF), sendBeacon, and GETs.
FOREIGN_ACTIONS_PAGE = """<!doctype html><html><body><script>
const base = "http://127.0.0.1:HTTP/api/dead-letters/";
const body = JSON.stringify({queue: "analytics_queue", dlq_id: DLQ, note: "pwned"});
window.result = {pending: 0, fetches: []};
function track(p, what) {
  window.result.pending += 1;
  p.then(r => window.result.fetches.push(what + ": " + r.type + " " + r.status),
         e => window.result.fetches.push(what + ": blocked " + e))
   .finally(() => { window.result.pending -= 1; });
}
for (const kind of ["replay", "discard"]) {
  track(fetch(base + kind, {method: "POST", credentials: "include",
    headers: {"Content-Type": "application/json"}, body}), kind + " json");
  track(fetch(base + kind, {method: "POST", credentials: "include", mode: "no-cors",
    headers: {"Content-Type": "text/plain"}, body}), kind + " no-cors");
  track(fetch(base + kind + "?queue=analytics_queue&dlq_id=DLQ&note=pwned",
    {credentials: "include", mode: "no-cors"}), kind + " get");
  window.result.beacon = navigator.sendBeacon(base + kind,
    new Blob([body], {type: "text/plain"}));
  for (const enctype of ["application/x-www-form-urlencoded", "text/plain"]) {
    const frame = document.createElement("iframe");
    frame.name = kind + enctype; document.body.append(frame);
    window.result.pending += 1;
    frame.onload = () => { window.result.pending -= 1; };
    const form = document.createElement("form");
    form.method = "POST"; form.action = base + kind; form.enctype = enctype;
    form.target = frame.name;
    const input = document.createElement("input");
    input.name = '{"queue": "analytics_queue", "dlq_id": DLQ, "note": "pwned", "x": "';
    input.value = '"}';
    form.append(input); document.body.append(form); form.submit();
  }
}
</script></body></html>"""


def test_a_discard_from_the_dashboard_is_audited_and_a_foreign_page_triggers_nothing(
        database_url: str, tmp_path: Path, chromium: Any) -> None:
    from playwright.sync_api import expect

    token = "dashboard-token-1234567890"
    site = tmp_path / "evil"
    site.mkdir()
    with reactor_running(database_url, tmp_path, "actions", FEED_TOKEN=token) as (
            _, http_port), psycopg.connect(database_url, autocommit=True) as conn:
        letters = [int(conn.execute("SELECT pgmq.send('analytics_queue_dlq', %s)", (Jsonb({
            "original": {"event": f"e{i}"}, "error": "event: Field required", "attempts": 1,
            "failed_at": "2026-12-04T10:00:00Z", "source_msg_id": 70 + i,
            "queue": "analytics_queue"}),)).fetchall()[0][0]) for i in range(2)]
        # The operator signs in: the browser now holds the SameSite=Strict session cookie.
        browser = chromium.new_context(viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{http_port}/")
        page.fill("#token", token)
        page.click("#signin button")
        expect(page.locator("#conn")).to_have_text("live", timeout=60_000)
        expect(page.get_by_test_id("dl-panel-analytics_queue")).to_have_attribute(
            "data-total", "2")

        # A stranger's page on another port of the same host (the same site: the cookie
        # goes along) tries to replay and discard.
        (site / "index.html").write_text(FOREIGN_ACTIONS_PAGE.replace("HTTP", str(http_port))
                                         .replace("DLQ", str(letters[0])))
        with static_site(site) as evil_port:
            evil = browser.new_page()  # the same browser: the same cookies
            evil.goto(f"http://127.0.0.1:{evil_port}/index.html")
            evil.wait_for_function("window.result.pending === 0", timeout=60_000)
            result = evil.evaluate("window.result")
        # Every attempt that left the browser reached the reactor and was refused there.
        def refusals() -> list[dict[str, Any]]:
            return [line for line in log_lines(tmp_path / "actions.log")
                    if line.get("event") == "http request refused"
                    and str(line.get("path", "")).startswith("/api/dead-letters/")]
        wait_until(lambda: len(refusals()) >= 6, what="the reactor to refuse the forms and "
                   "the no-cors fetches")
        assert {line["status"] for line in refusals()} <= {403, 415}
        assert all("blocked" in f for f in result["fetches"] if " json" in f)
        assert dlq_ids(conn, "analytics_queue") == letters
        assert audit_rows(conn) == []

        # The operator discards one, with a note, from the inspect view.
        page.bring_to_front()
        page.get_by_test_id(f"dl-inspect-analytics_queue-{letters[0]}").click()
        page.get_by_test_id("inspect-discard").click()
        expect(page.get_by_test_id("inspect-status")).to_contain_text("needs a note")
        page.get_by_test_id("inspect-note").fill("a test signup; never count it")
        page.get_by_test_id("inspect-discard").click()
        expect(page.get_by_test_id("dl-status")).to_contain_text(
            f"discarded dlq #{letters[0]}")
        expect(page.locator('#dl-actions tr[data-action="discard"]')).to_contain_text(
            "a test signup; never count it")
        expect(page.get_by_test_id("dl-panel-analytics_queue")).to_have_attribute(
            "data-total", "1")
        assert dlq_ids(conn, "analytics_queue") == [letters[1]]
        assert audit_rows(conn) == [("discard", "analytics_queue", [letters[0]], [70],
                                     "127.0.0.1", "a test signup; never count it")]
        assert conn.execute("SELECT msg_id FROM pgmq.a_analytics_queue_dlq").fetchall() == [
            (letters[0],)]


# The page's fetch, with every unfiltered listing held until the test lets it go: a slow
# answer (a big DLQ) to the 10 s timer's request, arriving after the filtered one.
HOLD_UNFILTERED = """() => {
  window.realFetch = window.fetch; window.held = [];
  window.fetch = (u, o) => u === "/api/dead-letters?limit=50"
    ? new Promise(resolve => window.held.push(() => resolve(window.realFetch(u, o))))
    : window.realFetch(u, o);
}"""
RELEASE = """() => { window.fetch = window.realFetch; for (const go of window.held) go(); }"""


def test_bulk_actions_use_the_filter_they_show_ask_first_and_send_the_count(
        database_url: str, tmp_path: Path, chromium: Any) -> None:
    """B1: a stale, unfiltered listing never replaces the panels of the filter the box
    shows; "replay all" names its filter beside the button, asks confirm() with the count
    and the filter, sends the count (the server refuses a changed one) and clears the
    note; a dismissed confirm does nothing."""
    from playwright.sync_api import expect

    queue = "analytics_queue"
    with psycopg.connect(database_url, autocommit=True) as conn:
        def letter(error: str, source: int) -> int:
            return int(conn.execute("SELECT pgmq.send(%s, %s)", (f"{queue}_dlq", Jsonb({
                "original": {"event": "x", "n": source}, "error": error, "attempts": 3,
                "source_msg_id": source, "queue": queue}))).fetchall()[0][0])
        timeout, other = letter("SMTP timeout", 1), letter("provider said no", 2)
        with reactor_running(database_url, tmp_path, "bulk") as (_, http_port):
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{http_port}/")
            panel = page.get_by_test_id(f"dl-panel-{queue}")
            shown_filter = page.get_by_test_id(f"dl-filter-{queue}")
            expect(panel).to_have_attribute("data-total", "2")
            page.evaluate(HOLD_UNFILTERED)
            page.evaluate("() => { deadLetters(); }")  # the timer fires, the answer is slow
            page.get_by_test_id("dl-reason").fill("timeout")  # ... as the operator types
            expect(panel).to_have_attribute("data-total", "1")
            page.evaluate(RELEASE)  # the stale, unfiltered answer arrives: dropped
            # At least one dropped (the 10 s timer may have had one dropped too). Not
            # wait_for_function: once its first look fails it polls with eval, which the
            # dashboard's CSP refuses (soak run 5, where the answer came late).
            expect(page.locator("#dl-panels")).to_have_attribute(
                "data-dropped", re.compile(r"^[1-9][0-9]*$"))
            expect(panel).to_have_attribute("data-total", "1")
            expect(shown_filter).to_have_text('filter: reason contains "timeout"')

            asked: list[str] = []
            page.get_by_test_id("dl-note").fill("relay fixed")
            page.once("dialog", answer(asked, accept=True))
            page.get_by_test_id(f"dl-replay-all-{queue}").click()
            expect(page.get_by_test_id("dl-status")).to_contain_text(f"replayed dlq #{timeout}")
            assert asked == [f'Replay 1 dead letter: the dead letters of {queue} whose reason '
                             'contains "timeout"?']
            assert dlq_ids(conn, queue) == [other]
            expect(page.get_by_test_id("dl-note")).to_have_value("")  # R2

            page.get_by_test_id("dl-reason").fill("")
            expect(shown_filter).to_have_text("filter: none (every dead letter)")
            expect(panel).to_have_attribute("data-total", "1")
            page.get_by_test_id("dl-note").fill("spam")
            page.once("dialog", answer(asked, accept=False))
            page.get_by_test_id(f"dl-discard-all-{queue}").click()
            expect(page.get_by_test_id("dl-status")).to_have_text("discard cancelled")
            assert asked[-1] == ("Discard 1 dead letter: every dead letter of "
                                 f"{queue} (no filter)?")
            # A count the server no longer holds (as if the panel were old): refused.
            page.once("dialog", answer([], accept=True))
            page.evaluate(f"() => bulk('discard', '{queue}', null, 5)")
            expect(page.get_by_test_id("dl-status")).to_contain_text("not the 5 you saw")
            assert dlq_ids(conn, queue) == [other]
            expect(page.get_by_test_id("dl-note")).to_have_value("spam")
        assert [r[0] for r in audit_rows(conn)] == ["replay"]
