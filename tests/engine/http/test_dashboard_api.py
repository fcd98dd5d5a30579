"""The dashboard page and its API: the history a page opened later reads from the
database, masked."""

from __future__ import annotations

from typing import Any

import httpx

from tests.harness import (
    running_reactor,
    send,
    wait_for,
)


async def test_dashboard_api_tells_history_from_the_database_masked(
        database_url: str, smtp_server: Any) -> None:
    server = smtp_server(reject=["anna.petrova@gmail.com"])
    env = {"EMAIL_PROVIDER": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": server.port,
           "SMTP_SECURITY": "none", "SMTP_FROM": "noreply@family.example", "MAX_ATTEMPTS": 1}
    mail = {"subject": "Hi", "template": "checkup_completed",
            "variables": {"full_name": "Anna", "assessment_id": "a1"}, "locale": "en"}
    async with running_reactor(database_url, **env) as reactor:
        with reactor.bus.subscribe() as sub:
            ok = await send(database_url, "email_queue", {**mail, "to": "ivan@example.com"})
            bad = await send(database_url, "email_queue",
                             {**mail, "to": "anna.petrova@gmail.com"})
            outcomes = await wait_for(sub, lambda e: (e["type"], e["msg_id"]) in {
                ("job.succeeded", ok), ("job.dead_lettered", bad)}, count=2)
    [event] = [e for e in outcomes if e["type"] == "job.dead_lettered"]
    assert "a***@gmail.com" in event["error"]
    # A new reactor, a page opened later: the story is in the database.
    async with running_reactor(database_url) as reactor, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{reactor.http_port}") as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert "<canvas id=\"chart\"" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert (await http.get("/api/config")).json() == {
            "feed_port": reactor.feed_port, "token_required": False, "signed_in": True}
        response = await http.get("/api/overview")
    assert "anna.petrova" not in response.text
    data = response.json()
    email = next(q for q in data["queues"] if q["queue"] == "email_queue")
    assert (email["done_1h"], email["dead_lettered_1h"], email["dead_letters"]) == (1, 1, 1)
    assert (email["done_24h"], email["dead_lettered_24h"]) == (1, 1)
    assert sum(email["throughput"].values()) == 1  # the chart counts finished jobs only
    [failure] = [f for f in data["failures"] if f["queue"] == "email_queue"]
    assert (failure["msg_id"], failure["outcome"], failure["attempt"]) == (
        bad, "dead_lettered", 1)
    assert "a***@gmail.com" in failure["error"]
    [letter] = data["dead_letters"]
    assert letter["msg_id"] == bad
    assert failure["dlq_msg_id"] == letter["dlq_msg_id"]
    assert "a***@gmail.com" in letter["error"]
    assert data["cron"] is None  # pg_cron lives in another database of this cluster
