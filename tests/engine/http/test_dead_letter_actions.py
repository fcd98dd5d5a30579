"""The dashboard's dead letters over raw HTTP: the panel, the inspect view (masked), replay
and discard (the code `reactor dlq` runs, audited and published), and who may act: a
request from another origin, a form, a GET or a cookie-only tool changes nothing.
The same in a real browser: tests/system/test_dead_letters_browser.py."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb
from starlette.requests import Request

from reactor.engine import dead_letters, queues
from reactor.engine.watch import format_event
from reactor.engine.web import _client
from reactor.testing import wait_for_each
from tests.harness import of_type, running_reactor, sql, wait_for


def letter(conn: psycopg.Connection, queue: str, original: Any, error: str,
           source: int) -> int:
    """A dead letter as the drainer writes it; returns its dlq id."""
    row = conn.execute("SELECT pgmq.send(%s, %s)", (f"{queue}_dlq", Jsonb({
        "original": original, "error": error, "attempts": 3, "failed_at": "2026-12-04T10:00:00Z",
        "source_msg_id": source, "queue": queue}))).fetchone()
    assert row is not None
    return int(row[0])


def audit(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT action, queue, dlq_ids, msg_ids, new_msg_ids, filter, client, "
                        "note FROM reactor.dead_letter_actions ORDER BY id").fetchall()


def waiting(conn: psycopg.Connection, queue: str) -> list[int]:
    return [int(r[0]) for r in conn.execute(
        f"SELECT msg_id FROM pgmq.q_{queue}_dlq ORDER BY msg_id").fetchall()]


def own(port: int) -> dict[str, str]:
    """What the dashboard page's fetch() sends with an action."""
    return {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin",
            "Content-Type": "application/json"}


async def test_the_panel_inspects_masked_and_replays_and_discards_with_an_audit_row(
        database_url: str, db: psycopg.Connection) -> None:
    typo = letter(db, "analytics_queue", {"event": "signup", "email": "anna.petrova@gmail.com"},
                  "event: bad value from anna.petrova@gmail.com", 41)
    other = letter(db, "analytics_queue", {"event": "x"}, "provider said no", 42)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        panel = await http.get("/api/dead-letters")
        assert panel.status_code == 200
        assert "anna.petrova" not in panel.text
        [analytics] = [p for p in panel.json()["queues"] if p["queue"] == "analytics_queue"]
        assert analytics["total"] == 2
        assert [(d["dlq_id"], d["msg_id"], d["attempts"]) for d in analytics["letters"]] == [
            (typo, 41, 3), (other, 42, 3)]
        assert analytics["letters"][0]["error"] == "event: bad value from a***@gmail.com"
        filtered = (await http.get("/api/dead-letters", params={
            "queue": "analytics_queue", "reason": "PROVIDER"})).json()
        assert [d["dlq_id"] for d in filtered["queues"][0]["letters"]] == [other]

        seen = await http.get(f"/api/dead-letters/analytics_queue/{typo}")
        assert seen.status_code == 200
        assert "anna.petrova" not in seen.text
        assert seen.json()["original"] == {"event": "signup", "email": "a***@gmail.com"}
        assert seen.json()["error"] == "event: bad value from a***@gmail.com"
        assert (await http.get("/api/dead-letters/analytics_queue/999")).status_code == 404
        assert (await http.get(f"/api/dead-letters/nope_queue/{typo}")).status_code == 404

        with reactor.bus.subscribe() as sub:
            replayed = await http.post("/api/dead-letters/replay", headers=own(reactor.http_port),
                                       json={"queue": "analytics_queue", "dlq_id": typo,
                                             "note": "fixed the producer"})
            assert replayed.status_code == 200, replayed.text
            [new_id] = replayed.json()["new_msg_ids"]
            # The job may finish before the handler publishes its action (a loaded machine).
            event, _ = await wait_for_each(sub, of_type("dlq.replayed"),
                                           of_type("job.succeeded", new_id))
        assert event["dlq_ids"] == [typo]
        assert event["msg_ids"] == [41]
        assert event["new_msg_ids"] == [new_id]
        assert event["client"] == "127.0.0.1"
        assert event["audit_id"] == replayed.json()["audit_id"]

        refused = await http.post("/api/dead-letters/discard", headers=own(reactor.http_port),
                                  json={"queue": "analytics_queue", "dlq_id": other})
        assert refused.status_code == 400
        assert "needs a note" in refused.json()["error"]
        with reactor.bus.subscribe() as sub:
            discarded = await http.post("/api/dead-letters/discard",
                                        headers=own(reactor.http_port),
                                        json={"queue": "analytics_queue", "dlq_id": other,
                                              "note": "a test event; never send"})
            assert discarded.status_code == 200, discarded.text
            [gone] = await wait_for(sub, of_type("dlq.discarded"))
        assert gone["note"] == "a test event; never send"
        again = await http.post("/api/dead-letters/discard", headers=own(reactor.http_port),
                                json={"queue": "analytics_queue", "dlq_id": other,
                                      "note": "twice"})
        assert again.status_code == 404
        # A dead letter whose body was not JSON cannot be replayed: it stays, and says why.
        await sql(database_url, "SELECT pgmq.send('analytics_queue_dlq', %s)", (Jsonb({
            "original": None, "original_text": "{not json", "error": "not valid JSON",
            "source_msg_id": 43}),))
        [(raw,)] = await sql(database_url, "SELECT max(msg_id) FROM pgmq.q_analytics_queue_dlq")
        stuck = await http.post("/api/dead-letters/replay", headers=own(reactor.http_port),
                                json={"queue": "analytics_queue", "dlq_id": raw})
        assert stuck.status_code == 409
        assert "not a JSON object" in stuck.json()["error"]
        shown = (await http.get(f"/api/dead-letters/analytics_queue/{raw}")).json()
        assert (shown["replayable"], shown["original_text"]) == (False, "{not json")
        await sql(database_url, "SELECT pgmq.delete('analytics_queue_dlq', %s::bigint)", (raw,))
        history = (await http.get("/api/dead-letters")).json()["actions"]
        assert [a["action"] for a in history] == ["discard", "replay"]

    assert waiting(db, "analytics_queue") == []
    assert db.execute("SELECT event FROM public.analytics_events").fetchall() == [("signup",)]
    # A discarded dead letter is kept in the dead-letter queue's archive.
    assert db.execute("SELECT msg_id FROM pgmq.a_analytics_queue_dlq ORDER BY msg_id"
                      ).fetchall() == [(typo,), (other,)]
    assert audit(db) == [
        ("replay", "analytics_queue", [typo], [41], [new_id], None, "127.0.0.1",
         "fixed the producer"),
        ("discard", "analytics_queue", [other], [42], None, None, "127.0.0.1",
         "a test event; never send")]


async def test_replay_all_matching_a_reason_leaves_the_others(
        database_url: str, db: psycopg.Connection) -> None:
    smtp = [letter(db, "analytics_queue", {"event": f"e{i}"}, "SMTP relay down", 10 + i)
            for i in range(3)]
    kept = letter(db, "analytics_queue", {"event": "k"}, "unknown template", 20)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        with reactor.bus.subscribe() as sub:
            result = await http.post("/api/dead-letters/replay", headers=own(reactor.http_port),
                                     json={"queue": "analytics_queue", "reason": "smtp relay",
                                           "expected_total": 3})
            assert result.status_code == 200, result.text
            await wait_for(sub, of_type("job.succeeded"), count=3)
    assert result.json()["dlq_ids"] == smtp
    assert result.json()["filter"] == "reason contains 'smtp relay'"
    assert waiting(db, "analytics_queue") == [kept]
    [(action, dlq_ids, filter_)] = db.execute(
        "SELECT action, dlq_ids, filter FROM reactor.dead_letter_actions").fetchall()
    assert (action, dlq_ids, filter_) == ("replay", smtp, "reason contains 'smtp relay'")


async def test_a_request_that_is_not_the_dashboards_own_changes_nothing(
        database_url: str, db: psycopg.Connection) -> None:
    dead = letter(db, "analytics_queue", {"event": "keep"}, "bad", 7)
    body = {"queue": "analytics_queue", "dlq_id": dead, "note": "n"}
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        port = reactor.http_port
        for path in ("/api/dead-letters/replay", "/api/dead-letters/discard"):
            # Another origin: another port of the same host (same-site: a cookie would go).
            evil = {**own(port), "Origin": "http://127.0.0.1:9", "Sec-Fetch-Site": "same-site"}
            assert (await http.post(path, headers=evil, json=body)).status_code == 403
            # The right Origin but the browser says the page was not ours.
            assert (await http.post(path, headers={**own(port), "Sec-Fetch-Site": "same-site"},
                                    json=body)).status_code == 403
            # A form (text/plain, urlencoded): never JSON.
            assert (await http.post(path, headers={**own(port), "Content-Type": "text/plain"},
                                    content=b'{"queue": "analytics_queue"}')).status_code == 415
            # A browser request with no Origin (it always sends one on POST).
            assert (await http.post(path, headers={"Sec-Fetch-Site": "cross-site",
                                                   "Content-Type": "application/json"},
                                    json=body)).status_code == 403
            # GET never acts.
            assert (await http.get(path, params={"queue": "analytics_queue",
                                                 "dlq_id": dead})).status_code == 405
            # Through a proxy, without FEED_TOKEN: refused like the rest of the API.
            assert (await http.post(path, headers={**own(port), "X-Forwarded-For": "1.2.3.4"},
                                    json=body)).status_code == 403
            # A foreign Host (DNS rebinding).
            assert (await http.post(path, headers={**own(port), "Host": "evil.example"},
                                    json=body)).status_code == 421
    assert waiting(db, "analytics_queue") == [dead]
    assert audit(db) == []


async def test_with_a_token_an_action_needs_it_and_records_the_proxied_client(
        database_url: str, db: psycopg.Connection) -> None:
    dead = letter(db, "analytics_queue", {"event": "keep"}, "bad", 7)
    token = "action-token-1234567890"
    body = {"queue": "analytics_queue", "dlq_id": dead, "note": "checked by hand"}
    async with running_reactor(database_url, FEED_TOKEN=token) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        port = reactor.http_port
        path = "/api/dead-letters/discard"
        assert (await http.post(path, headers=own(port), json=body)).status_code == 401
        signed = await http.post("/api/session", headers={"Origin": f"http://127.0.0.1:{port}"},
                                 json={"token": token})
        cookie = signed.cookies["reactor_session"]
        # The sign-in cookie alone is not enough for a caller that is no page of ours.
        no_origin = await http.post(path, json=body, headers={
            "Content-Type": "application/json", "Cookie": f"reactor_session={cookie}"})
        assert no_origin.status_code == 401
        assert audit(db) == []
        done = await http.post(path, json=body, headers={
            "Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9"})
        assert done.status_code == 200, done.text
    assert waiting(db, "analytics_queue") == []
    [row] = audit(db)
    assert row[6] == "203.0.113.9 via 127.0.0.1"
    assert await sql(database_url, "SELECT count(*) FROM pgmq.a_analytics_queue_dlq") == [(1,)]


def test_reactor_watch_shows_who_acted_on_which_dead_letters() -> None:
    line = format_event({"ts": 0, "type": "dlq.discarded", "queue": "email_queue",
                         "msg_id": 8, "dlq_ids": [1], "client": "127.0.0.1",
                         "note": "family called"}, color=False)
    assert line.endswith("dlq.discarded       msg #8  dlq #1 by 127.0.0.1: family called")


Q = "analytics_queue"


async def test_a_bulk_action_needs_the_count_its_caller_saw_and_does_nothing_if_it_changed(
        database_url: str, db: psycopg.Connection) -> None:
    """B1: "replay all"/"discard all" send the listing's total (expected_total); without
    it the server refuses, and when the queue holds another number by then (a new dead
    letter, another operator's replay) nothing is done: 409, look again."""
    timeouts = [letter(db, Q, {"event": f"t{i}"}, "SMTP timeout", i) for i in range(2)]
    other = letter(db, Q, {"event": "o"}, "provider said no", 9)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        path, headers = "/api/dead-letters/discard", own(reactor.http_port)
        listed = (await http.get("/api/dead-letters", params={"queue": Q,
                                                              "reason": "timeout"})).json()
        assert listed["queues"][0]["total"] == 2
        missing = await http.post(path, headers=headers, json={
            "queue": Q, "reason": "timeout", "note": "n"})
        assert missing.status_code == 400
        assert "expected_total" in missing.json()["error"]
        await sql(database_url, "SELECT pgmq.send('analytics_queue_dlq', %s)", (Jsonb({
            "original": {"event": "late"}, "error": "SMTP timeout", "source_msg_id": 5}),))
        stale = await http.post(path, headers=headers, json={
            "queue": Q, "reason": "timeout", "note": "n", "expected_total": 2})
        assert stale.status_code == 409
        assert stale.json()["total"] == 3
        assert "now has 3 dead letter(s) whose reason contains 'timeout', not the 2 you " \
               "saw" in stale.json()["error"]
        by_id = await http.post(path, headers=headers, json={
            "queue": Q, "dlq_id": other, "note": "n", "expected_total": 1})
        assert by_id.status_code == 400
        done = await http.post(path, headers=headers, json={
            "queue": Q, "reason": "timeout", "note": "n", "expected_total": 3})
        assert done.status_code == 200, done.text
    assert waiting(db, Q) == [other]
    [(dlq_ids,)] = db.execute("SELECT dlq_ids FROM reactor.dead_letter_actions").fetchall()
    assert dlq_ids[:2] == timeouts
    assert len(dlq_ids) == 3


async def test_a_blank_reason_is_refused_and_the_listing_counts_what_it_lists(
        database_url: str, db: psycopg.Connection) -> None:
    """B2: a reason given but blank is no filter: refused (API 400), never "everything";
    the listing's total and letters apply the same filter."""
    a = letter(db, Q, {"event": "x"}, "timeout", 1)
    b = letter(db, Q, {"event": "y"}, "provider said no", 2)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        for path in ("/api/dead-letters/discard", "/api/dead-letters/replay"):
            blank = await http.post(path, headers=own(reactor.http_port), json={
                "queue": Q, "reason": "   ", "note": "only blanks?", "expected_total": 2})
            assert blank.status_code == 400
            assert "blank" in blank.json()["error"]
        listing = await http.get("/api/dead-letters", params={"queue": Q, "reason": "  "})
        assert listing.status_code == 400
        for reason, ids in (("  timeout", []), ("out", [a]), ("O", [a, b])):
            [panel] = (await http.get("/api/dead-letters", params={
                "queue": Q, "reason": reason})).json()["queues"]
            assert [d["dlq_id"] for d in panel["letters"]] == ids
            assert panel["total"] == len(ids)
    assert waiting(db, Q) == [a, b]
    assert audit(db) == []
    with pytest.raises(ValueError, match="blank"):
        dead_letters.Selection(Q, reason=" ")


def scope_with(*forwarded: str, real_ip: str | None = None) -> Request:
    headers = [(b"x-forwarded-for", f.encode()) for f in forwarded]
    if real_ip is not None:
        headers.append((b"x-real-ip", real_ip.encode()))
    return Request({"type": "http", "headers": headers, "client": ("127.0.0.1", 5555),
                    "method": "POST", "path": "/", "query_string": b""})


def test_the_audit_client_is_the_peer_and_what_the_nearest_proxy_saw() -> None:
    """B3: a client can write anything into X-Forwarded-For; the proxy appends what it saw
    at the right. Only that entry is recorded (never the forgeable left part), short."""
    forged = "198.51.100.7" + ",10.0.0.1" * 30
    assert _client(scope_with(f"{forged}, 203.0.113.9")) == "203.0.113.9 via 127.0.0.1"
    # Two headers (a proxy that adds its own line): the last line's last entry.
    assert _client(scope_with("198.51.100.7", "10.0.0.1, 203.0.113.9")) == \
        "203.0.113.9 via 127.0.0.1"
    assert _client(scope_with("[2001:db8::1]:4711")) == "[2001:db8::1]:4711 via 127.0.0.1"
    assert _client(scope_with(real_ip="203.0.113.9")) == "203.0.113.9 via 127.0.0.1"
    assert _client(scope_with()) == "127.0.0.1"
    junk = _client(scope_with("1.2.3.4, " + "x\x1b[2J" * 100))
    assert junk.startswith("unparsed 'x?[2J")
    assert junk.endswith(" via 127.0.0.1")
    assert len(junk) < 100
    assert "\x1b" not in junk


async def test_ids_out_of_range_and_database_errors_are_json_errors(
        database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """B4: an id Postgres cannot hold is a 400, not a bare 500; a database error in an
    action answers in JSON what failed and that it rolled back."""
    dead = letter(db, Q, {"event": "x"}, "bad", 1)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        headers = own(reactor.http_port)
        huge = await http.get(f"/api/dead-letters/{Q}/{'9' * 30}")
        assert huge.status_code == 400
        assert "1 to 9223372036854775807" in huge.json()["error"]
        assert (await http.get(f"/api/dead-letters/{Q}/0")).status_code == 400
        for dlq_id in (10**30, 2**63, 0, -1):
            refused = await http.post("/api/dead-letters/replay", headers=headers,
                                      json={"queue": Q, "dlq_id": dlq_id})
            assert refused.status_code == 400, (dlq_id, refused.text)
        for total in (-1, 2**63):
            refused = await http.post("/api/dead-letters/replay", headers=headers,
                                      json={"queue": Q, "expected_total": total})
            assert refused.status_code == 400, (total, refused.text)

        def failing(conn: psycopg.Connection, *args: Any, **kwargs: Any) -> Any:
            conn.execute("SELECT 1/0")  # inside the action's transaction, after the archive
            raise AssertionError("unreachable")
        monkeypatch.setattr(dead_letters, "_record", failing)
        broken = await http.post("/api/dead-letters/replay", headers=headers,
                                 json={"queue": Q, "dlq_id": dead, "note": "n"})
        assert broken.status_code == 500
        assert broken.headers["content-type"] == "application/json"
        assert broken.json()["error"] == (
            f"replay of dlq #{dead} of {Q} failed in the database (DivisionByZero: division "
            "by zero); the transaction was rolled back: nothing was done")
    assert waiting(db, Q) == [dead]
    assert db.execute(f"SELECT count(*) FROM pgmq.q_{Q}").fetchone() == (0,)


async def test_a_connection_lost_while_committing_says_the_state_is_unknown(
        database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """B4: the action's transaction is done, then its connection dies before the commit is
    answered: nobody knows whether it committed, and the answer says so."""
    dead = letter(db, Q, {"event": "x"}, "bad", 1)
    record = dead_letters._record

    def record_then_lose_the_connection(conn: psycopg.Connection, *args: Any,
                                        **kwargs: Any) -> Any:
        recorded = record(conn, *args, **kwargs)
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s, 30000)", (conn.info.backend_pid,))
        return recorded
    monkeypatch.setattr(dead_letters, "_record", record_then_lose_the_connection)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        lost = await http.post("/api/dead-letters/discard", headers=own(reactor.http_port),
                               json={"queue": Q, "dlq_id": dead, "note": "n"})
    assert lost.status_code == 503
    error = lost.json()["error"]
    assert "the connection to the database was lost while it committed" in error
    assert "the state is unknown: see the history" in error
    assert "nothing was done" not in error


async def test_a_note_with_control_characters_is_refused(
        database_url: str, db: psycopg.Connection) -> None:
    """R3: a note is one line of text; an escape sequence in it would reach terminals."""
    dead = letter(db, Q, {"event": "x"}, "bad", 1)
    async with running_reactor(database_url) as reactor, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        for note in ("ok\x1b[2J", "two\nlines", "c1\x9b2J", "tab\there"):
            refused = await http.post("/api/dead-letters/replay", headers=own(reactor.http_port),
                                      json={"queue": Q, "dlq_id": dead, "note": note})
            assert refused.status_code == 400
            assert "no control characters" in refused.json()["error"]
    assert waiting(db, Q) == [dead]
    assert audit(db) == []


def test_reactor_watch_escapes_control_characters() -> None:
    """R3: whatever an event carries (a client, a note, an error) cannot drive the
    terminal: C0 and C1 characters are printed escaped, and the line stays one line."""
    line = format_event({"ts": 0, "type": "dlq.replayed", "queue": Q, "dlq_ids": [1],
                         "client": "1.2.3.4\x9b2J via 127.0.0.1",
                         "note": "ok\x1b[2J\x1b[1;1Hforged\nnext",
                         "error": "bell\x07"}, color=True)
    assert line.endswith("dlq #1 by 1.2.3.4\\x9b2J via 127.0.0.1: "
                         "ok\\x1b[2J\\x1b[1;1Hforged\\x0anext  bell\\x07")
    assert not any(ch in line for ch in "\x1b\x9b\n\x07")


def test_the_old_replay_without_an_audit_row_is_gone() -> None:
    """R6: every replay goes through reactor.engine.dead_letters (archived first, audited)."""
    assert not hasattr(queues, "replay_dead_letters")
