"""Deferred: the other side said "not now". The engine puts the body back with the
processor's stamp, counts no attempt, deletes (not archives) the deferred delivery, and
announces job.deferred, never job.retrying (issue 33)."""

from __future__ import annotations

from typing import ClassVar

from reactor.engine.errors import Deferred
from reactor.engine.processor import Job, MessageModel, Processor
from reactor.engine.watch import format_event
from tests.harness import of_type, running_reactor, send, sql, wait_for


class Knock(MessageModel):
    name: str
    knocks: int = 0  # stamped by the processor on each deferral


class PatientProcessor(Processor[Knock]):
    """Is let in at the third knock; until then the door says "not now"."""

    model = Knock
    bodies: ClassVar[list[dict[str, object]]] = []

    async def handle(self, job: Job[Knock]) -> None:
        PatientProcessor.bodies.append(dict(job.delivery.body))
        if job.message.knocks < 3:
            raise Deferred(f"not now (knock {job.message.knocks + 1})", 1,
                           stamp={"knocks": job.message.knocks + 1})


async def test_a_deferred_job_comes_back_stamped_and_never_counts_as_an_attempt(
        database_url: str) -> None:
    PatientProcessor.bodies = []
    async with running_reactor(database_url, {"analytics_queue": PatientProcessor},
                               MAX_ATTEMPTS=1) as reactor:
        with reactor.bus.subscribe() as sub:
            first = await send(database_url, "analytics_queue", {"name": "Anna",
                                                                 "priority": 3})
            deferred = await wait_for(sub, of_type("job.deferred"), count=3)
            [done] = await wait_for(sub, of_type("job.succeeded"))
        metrics = reactor.metrics.render().decode()
    assert [e["msg_id"] for e in deferred] == [first, *(e["requeued_as"] for e in deferred[:2])]
    assert done["msg_id"] == deferred[-1]["requeued_as"]
    assert all(e["attempt"] == 1 for e in [*deferred, done])  # a new message each time
    assert [e["retry_in_s"] for e in deferred] == [1, 1, 1]
    assert deferred[0]["error"] == "not now (knock 1)"
    assert [b.get("knocks", 0) for b in PatientProcessor.bodies] == [0, 1, 2, 3]
    assert all(b["name"] == "Anna" and b["priority"] == 3 for b in PatientProcessor.bodies)
    assert not [e for e in reactor.bus.recent
                if e["type"] in ("job.retrying", "job.dead_lettered")]
    assert 'reactor_jobs_deferred_total{queue="analytics_queue"} 3.0' in metrics
    # Every outcome series exists from the start (alert rules need them), at 0 here.
    assert 'reactor_jobs_total{outcome="retried",queue="analytics_queue"} 0.0' in metrics
    # Only the delivery that succeeded is archived (counted as done); nothing is left,
    # nothing was recorded as a failure.
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue") == [
        (done["msg_id"],)]
    assert await sql(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == [(0,)]
    assert await sql(database_url, "SELECT count(*) FROM reactor.job_failures") == [(0,)]


def test_reactor_watch_shows_where_a_deferred_job_went_and_when() -> None:
    line = format_event({"ts": 1795680000.25, "type": "job.deferred", "queue": "email_queue",
                         "msg_id": 8, "attempt": 1, "duration_ms": 3.0, "retry_in_s": 60,
                         "requeued_as": 9, "error": "recipient deferred: 451 4.7.1"},
                        color=False)
    assert "msg #8" in line
    assert "-> msg #9 in 60s" in line
    assert line.endswith("recipient deferred: 451 4.7.1")
