"""An attacker's and failing network's review of issue 14's hot path (commits 951c1f9,
1203c47): the trio-native connection and the archive-and-take statement of the drainers,
and the PDF renderer's shared fonts and cut embedding.

Everything runs against real components: a real Postgres (the fixtures' clusters), real
pgmq SQL, the real renderer and poppler's tools. Some tests reproduce a defect the
review found (each was fixed; they keep it fixed), the others prove what held.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, LiteralString

import psycopg
import pytest
import trio

from reactor.clinic.reports import (
    MAX_DOMAIN_CHARS,
    MAX_RECOMMENDATIONS,
    MAX_SCORES,
    MAX_TEXT_CHARS,
    check_report_size,
)
from reactor.clinic.resources import TEMPLATES_DIR
from reactor.clinic.services.pdf import (
    Fonts,
    ReportData,
    Score,
    find_fonts,
    prepare_fonts,
    render_report,
)
from reactor.engine import queues
from reactor.engine.db import Database, in_worker_thread
from reactor.engine.pgcluster import PgCluster
from reactor.engine.processor import Job, MessageModel
from tests.clinic.reports.test_reports import outlined
from tests.harness import (
    ScriptedProcessor,
    eventually,
    of_type,
    running_reactor,
    scripted_processor,
    send,
    sql,
    wait_for,
)
from tests.pgbouncer import pgbouncer

QUEUE = "analytics_queue"


def _only(processor: type[Any]) -> dict[str, type[Any]]:
    return {QUEUE: processor}


async def _statement(db: Database) -> queues.Take:
    return await db.run(lambda c: queues.take_statement(c, QUEUE, vt=30, batch=100))


async def _count(url: str, query: str, params: Any = None) -> int:
    [(value,)] = await sql(url, query, params)
    return int(value)


async def _eq(value: Any, expected: Any) -> bool:
    """For `eventually`: an awaited query's result equals `expected`."""
    return bool(await value == expected)


# -- 1. the archive inside the take is skipped when the planner puts the take first -------
async def test_the_take_archives_what_finished_when_nothing_else_is_visible(
        database_url: str) -> None:
    msg_id = await send(database_url, QUEUE, {"event": "a"})
    async with Database(database_url, 2).opened() as db:
        statement = await _statement(db)
        [taken] = await queues.archive_then_read(db, statement, QUEUE, [], 30, 100)
        assert taken.msg_id == msg_id
        # What autovacuum does to a queue table after 50 changes, at a quiet moment: a few
        # rows (in flight, or retries waiting). An empty table is not enough: the planner
        # then assumes ten pages of rows.
        await sql(database_url, "ANALYZE pgmq.q_analytics_queue")
        # The job finished; the drainer archives it with its next take (nothing visible).
        assert await queues.archive_then_read(db, statement, QUEUE, [msg_id], 30, 100) == []
    assert await sql(database_url, "SELECT msg_id FROM pgmq.a_analytics_queue") == [(msg_id,)]
    assert await _count(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0


async def test_a_finished_job_on_a_quiet_analyzed_queue_is_not_run_again(
        database_url: str) -> None:
    ids = [await send(database_url, QUEUE, {"n": n}, notify=False) for n in range(3)]
    await sql(database_url, "ANALYZE pgmq.q_analytics_queue")  # small and analyzed: quiet
    processor = scripted_processor(concurrency=1)
    async with running_reactor(database_url, _only(processor), VISIBILITY_TIMEOUT_S=2) as reactor:
        await eventually(lambda: len(processor.finished) >= 3, within_s=20)
        with reactor.bus.subscribe() as sub:
            for _ in range(4):  # a few messages at once, as an app sends them
                rows = await sql(database_url, "SELECT public.enqueue('analytics_queue', "
                                 "jsonb_build_object('n', i)) FROM generate_series(1, 3) AS i")
                ids += [int(msg_id) for (msg_id,) in rows]
                await wait_for(sub, of_type("job.succeeded"), count=3, within_s=20)
        # Every finished job is archived (the queue empties), and none runs twice: a lease of
        # 2 s that ran out on a message left in the queue would deliver it again.

        async def archived_or_run_again() -> bool:
            return len(processor.seen) > len(ids) or await _count(
                database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0

        await eventually(archived_or_run_again, within_s=20, every_s=0.1)
        assert sorted(processor.seen) == [(i, 1) for i in ids]
        assert await _count(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0


# -- 2. priority among the messages read ahead ------------------------------------------------
class GatedMessage(MessageModel):
    priority: int = 0
    gate: bool = False  # wait until the test opens the gate


class Gated(ScriptedProcessor):
    """One worker; a gate message holds it while the drainer reads ahead."""

    model = GatedMessage  # type: ignore[assignment]
    concurrency = 1
    order: ClassVar[list[int]] = []
    opened: ClassVar[trio.Event]

    async def handle(self, job: Job[GatedMessage]) -> None:  # type: ignore[override]
        type(self).order.append(job.msg_id)
        if job.message.gate:
            await type(self).opened.wait()


async def test_priority_decides_among_every_message_read_ahead(database_url: str) -> None:
    Gated.order = []
    Gated.opened = trio.Event()

    async def read_so_far() -> int:
        return await _count(database_url,
                            "SELECT count(*) FROM pgmq.q_analytics_queue WHERE read_ct > 0")

    async def enqueue(priority: int) -> list[int]:
        rows = await sql(database_url, "SELECT public.enqueue('analytics_queue', "
                         "jsonb_build_object('priority', %s::int, 'n', i)) "
                         "FROM generate_series(1, 3) AS i", (priority,))
        return [int(msg_id) for (msg_id,) in rows]

    async with running_reactor(database_url, _only(Gated), MAX_TASKS_PER_CYCLE=3):
        gate = await send(database_url, QUEUE, {"gate": True})
        await eventually(lambda: Gated.order == [gate], within_s=20)
        low = await enqueue(0)
        await eventually(lambda: _eq(read_so_far(), 4), within_s=20)
        high = await enqueue(9)
        await eventually(lambda: _eq(read_so_far(), 7), within_s=20)  # read ahead, all busy
        Gated.opened.set()
        await eventually(lambda: len(Gated.order) == 7, within_s=20)
    assert Gated.order == [gate, *high, *low]


# -- 3. cancellation at every await of the trio-native connection -----------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _reactor_backends(url: str) -> int:
    return await _count(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND application_name = 'reactor'")


async def test_cancelling_fetch_anywhere_leaks_no_connection_or_descriptor(
        database_url: str) -> None:
    """A sweep of deadlines from 0 to 15 ms cuts `fetch` while it connects (a worker thread
    abandoned), sends, or waits for the answer: every interrupted connection is closed (on
    the server too) by the code, not by the garbage collector; none is reused mid-statement;
    no descriptor stays open."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with Database(database_url, 2).opened() as db:
            assert await db.fetch(b"SELECT 1") == [(1,)]
            fds = _open_fds()
            cut = 0
            for step in range(300):
                with trio.move_on_after(step * 0.00005) as scope:
                    rows = await db.fetch(b"SELECT %(n)s::int, pg_sleep(0.002)", {"n": step})
                    assert rows == [(step, "")]  # never the answer of an earlier, cut statement
                cut += scope.cancelled_caught
            assert cut > 10
            assert await db.fetch(b"SELECT 2") == [(2,)]
            await eventually(lambda: _eq(_reactor_backends(database_url), 1), within_s=20)
            await eventually(lambda: _open_fds() <= fds, within_s=20)
        await eventually(lambda: _eq(_reactor_backends(database_url), 0), within_s=20)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []


async def test_many_tasks_fetching_at_once_share_at_most_pool_size_connections(
        database_url: str) -> None:
    """psycopg's asyncio.Lock of a connection would raise under trio if two tasks used one
    connection at once: 40 tasks on a pool of 3 never do, and use 3 connections."""
    pids: set[int] = set()
    async with Database(database_url, 3).opened() as db:
        async def many() -> None:
            for _ in range(5):
                [(pid, _slept)] = await db.fetch(b"SELECT pg_backend_pid(), pg_sleep(0.002)")
                pids.add(pid)

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(many)
    assert 1 <= len(pids) <= 3


# -- 4. failing network, replicas, a recreated queue -----------------------------------------
async def _enqueue_many(url: str, total: int) -> list[int]:
    rows = await sql(url, "SELECT public.enqueue('analytics_queue', jsonb_build_object('n', i)) "
                     "FROM generate_series(1, %s) AS i", (total,))
    return [int(msg_id) for (msg_id,) in rows]


async def test_two_replicas_handle_every_message_exactly_once(database_url: str) -> None:
    """Two reactors read ahead on one queue: no message is handled twice or lost."""
    total = 600
    processor = scripted_processor(concurrency=8, expected=total)
    async with running_reactor(database_url, _only(processor), MAX_TASKS_PER_CYCLE=20), \
            running_reactor(database_url, _only(processor), MAX_TASKS_PER_CYCLE=20):
        ids = await _enqueue_many(database_url, total)
        with trio.fail_after(60):
            await processor.all_done.wait()
    assert sorted(processor.seen) == [(i, 1) for i in ids]
    assert len(processor.per_instance) == 2  # both replicas took a share


async def _kill_until(done: trio.Event, url: str, which: LiteralString, *,
                      within_s: float) -> int:
    """pg_terminate_backend on the backends `which` selects, every 50 ms, until `done`;
    how many rounds it took."""
    kills = 0
    with trio.fail_after(within_s):
        while not done.is_set():
            await sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND " + which)
            kills += 1
            with trio.move_on_after(0.05):
                await done.wait()
    return kills


async def test_killing_the_reactors_connections_mid_drain_loses_and_doubles_nothing(
        database_url: str) -> None:
    """pg_terminate_backend on every connection of the reactor, again and again, while it
    drains: each take either happened or did not; nothing is lost, nothing runs twice."""
    total = 1500
    processor = scripted_processor(concurrency=8, expected=total)
    async with running_reactor(database_url, _only(processor), MAX_TASKS_PER_CYCLE=25):
        ids = await _enqueue_many(database_url, total)
        kills = await _kill_until(processor.all_done, database_url,
                                  "application_name = 'reactor'", within_s=90)
        assert kills > 3
    assert sorted(set(processor.finished)) == ids
    assert len(processor.finished) == total  # nothing ran to completion twice


async def test_a_queue_dropped_and_recreated_under_a_running_job_loses_no_new_message(
        database_url: str) -> None:
    """pgmq.create numbers messages from 1 again: a new message with the id of a job still
    running is a new message (its enqueued_at differs), not a re-read of the old one. The
    old job is stopped (its message went with the old queue); the new one runs, once."""
    Gated.order = []
    Gated.opened = trio.Event()
    async with running_reactor(database_url, _only(Gated)):
        old = await send(database_url, QUEUE, {"gate": True})
        await eventually(lambda: Gated.order == [old], within_s=20)
        await sql(database_url, "SELECT pgmq.drop_queue('analytics_queue')")
        await sql(database_url, "SELECT pgmq.create('analytics_queue')")
        new = await send(database_url, QUEUE, {"n": "after the reset"})
        assert new == old  # the id is used again

        async def new_one_archived() -> bool:
            return await sql(database_url, "SELECT msg_id, read_ct FROM "
                             "pgmq.a_analytics_queue") == [(new, 1)]

        await eventually(new_one_archived, within_s=20)
        Gated.opened.set()
    assert Gated.order == [old, new]
    assert await _count(database_url, "SELECT count(*) FROM pgmq.q_analytics_queue") == 0


async def test_a_queue_dropped_and_recreated_while_idle_is_drained_again(
        database_url: str) -> None:
    """The take is composed once per drainer: after the queue is recreated (and while it was
    missing) the drainer waits it out and drains the new table."""
    processor = scripted_processor(concurrency=2)
    async with running_reactor(database_url, _only(processor)) as reactor:
        with reactor.bus.subscribe() as sub:
            first = await send(database_url, QUEUE, {"n": 1})
            await wait_for(sub, of_type("job.succeeded", first), within_s=20)
            await eventually(lambda: reactor.drainers[QUEUE].idle, within_s=20)
            await sql(database_url, "SELECT pgmq.drop_queue('analytics_queue')")
            # A wake-up while the table is gone: the drainer reports it and backs off.
            await sql(database_url, "SELECT pg_notify('reactor_wakeup', 'analytics_queue')")
            await wait_for(sub, lambda e: e["type"] == "health.degraded", within_s=20)
            await sql(database_url, "SELECT pgmq.create('analytics_queue')")
            second = await send(database_url, QUEUE, {"n": 2})
            await wait_for(sub, of_type("job.succeeded", second), within_s=30)
        await eventually(lambda: reactor.health.reasons() == [], within_s=30)
    assert sorted(processor.finished) == [first, second]


async def test_connections_stay_within_what_docs_supabase_md_says(database_url: str) -> None:
    """DB_POOL_SIZE + one per queue + the listener (docs/supabase.md), also after every
    connection was killed and the reactor recovered."""
    async with running_reactor(database_url, DB_POOL_SIZE=2) as reactor:
        limit = 2 + len(reactor.drainers) + 1
        await eventually(lambda: all(d.idle for d in reactor.drainers.values()), within_s=30)
        assert 1 <= await _reactor_backends(database_url) <= limit
        await sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = current_database() AND application_name = 'reactor'")
        with reactor.bus.subscribe() as sub:
            for queue in reactor.drainers:
                await sql(database_url, "SELECT pg_notify('reactor_wakeup', %s)", (queue,))
            msg_id = await send(database_url, QUEUE, {"event": "after", "properties": {}})
            await wait_for(sub, of_type("job.succeeded", msg_id), within_s=30)
        await eventually(lambda: all(d.idle for d in reactor.drainers.values()), within_s=30)
        assert 1 <= await _reactor_backends(database_url) <= limit


@pytest.mark.process
async def test_behind_pgbouncer_killed_server_connections_lose_and_double_nothing(
        private_cluster: PgCluster) -> None:
    """A transaction pooler (two server connections for every client) whose server
    connections are killed again and again while the trio-native takes go through it."""
    total = 2000
    processor = scripted_processor(concurrency=8, expected=total)
    direct = private_cluster.url()
    with pgbouncer(private_cluster) as pooled_url:
        async with running_reactor(pooled_url, _only(processor), WORKER_INTERVAL_MS=300,
                                   MAX_TASKS_PER_CYCLE=20):
            ids = await _enqueue_many(direct, total)
            kills = await _kill_until(processor.all_done, direct,
                                      "pid <> pg_backend_pid() AND backend_type = 'client backend'",
                                      within_s=120)
    assert kills > 3
    assert sorted(set(processor.finished)) == ids
    assert len(processor.finished) == total


# -- 5. the PDF renderer: hostile checkup text, the caps, threads, an abandoned render --------
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
WHEN = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
# What a parent or therapist could type, one kind per report: characters outside the font
# (drawn as boxes, never as another glyph), invisible and control characters, odd numbers.
HOSTILE = {
    "nul": "a\x00b", "controls": "a\x01\x07\x1b[31m\x7fb\r\tc", "nonchars": "a\uffffb\ufffe",
    "emoji": "мама 😀👨\u200d👩\u200d👧 ok", "cjk": "孩子 睡眠 好", "rtl": "שלום مرحبا",
    "combining": "e\u0301 a\u0308 ё", "zero_width": "a\u200db\u200c\u2060c\ufeff",
    "bidi_override": "\u202eevil\u202c", "soft_hyphen": "ab\u00adcd", "last_plane": "\U0010ffff",
}


def _render(data: ReportData, fonts: Fonts, locale: str = "en",
            templates_dir: Path = TEMPLATES_DIR) -> bytes:
    return render_report(data, locale=locale, fonts=fonts, templates_dir=templates_dir,
                         app_name="Family Mind", now=WHEN)


def _poppler(tool: str, pdf: bytes, *args: str) -> str:
    """Run a poppler tool on the PDF; any complaint of its parser fails the test."""
    out = subprocess.run([tool, *args, "-", *(["-"] if tool == "pdftotext" else [])],
                         input=pdf, capture_output=True, timeout=120, check=True)
    assert out.stderr == b"", out.stderr.decode(errors="replace")
    return out.stdout.decode("utf-8", errors="replace")


def _rasterise(pdf: bytes, dpi: int) -> int:
    """Draw every page with pdftoppm (into a directory of its own); the pages drawn."""
    with tempfile.TemporaryDirectory(prefix="review-pages-") as folder:
        out = subprocess.run(["pdftoppm", "-r", str(dpi), "-gray", "-", f"{folder}/page"],
                             input=pdf, capture_output=True, timeout=120, check=True)
        assert out.stderr == b"", out.stderr.decode(errors="replace")
        return len(os.listdir(folder))


def _fold(text: str) -> str:
    return " ".join(text.split())


def _letters(text: str) -> str:
    """The letters and digits of `text`: what survives any line breaking or bidi reordering
    of a text extractor."""
    return "".join(c for c in text if c.isalnum())


def _in_font(text: str) -> str:
    """What of `text` the report font draws (and poppler can give back)."""
    drawn = set(map(chr, _font_unicodes()))
    return "".join(c for c in text if c in drawn)


def _font_unicodes() -> list[int]:
    from reactor.clinic.services.pdf import _UNICODES
    return list(_UNICODES)


@pytest.fixture(scope="module")
def fonts(tmp_path_factory: pytest.TempPathFactory) -> Fonts:
    return prepare_fonts(find_fonts(DEJAVU), tmp_path_factory.mktemp("fonts"))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_checkup_text_gives_a_pdf_that_opens_and_reads_back(
        fonts: Fonts, kind: str) -> None:
    typed = HOSTILE[kind]
    data = ReportData("h-1", f"Kid {typed} End", None, WHEN,
                      [Score(f"Domain {typed}", 1e300, 1e-300, "high")],
                      f"Summary {typed} done", [f"Advice {typed} now"])
    pdf = _render(data, fonts)
    text = _fold(_poppler("pdftotext", pdf, "-enc", "UTF-8"))
    letters = _letters(text)
    for part in (f"Kid {typed} End", f"Summary {typed} done", f"Advice {typed} now"):
        # poppler gives back the letters the font draws, in order; what it lacks is a box,
        # and no glyph of another character stands in for it.
        assert _letters(_in_font(part)) in letters
    assert "1e+300 / 1e-300" in text
    fonts_table = _poppler("pdffonts", pdf)
    assert fonts_table.count("CID TrueType") == 2
    assert fonts_table.count(" yes yes yes ") == 2
    assert _rasterise(pdf, 20) == 1  # the page draws without a complaint


def _worst(offset: int) -> ReportData:
    """A report at every cap (reactor.clinic.reports), of as many different glyphs as the
    font has, with unbreakable runs (line breaking by character) and odd numbers."""
    alphabet = "".join(chr(c) for c in _font_unicodes() if chr(c).isprintable())

    def chunk(n: int, at: int, spaces: bool = True) -> str:
        text = (alphabet * 30)[offset + at:offset + at + n]
        return text if spaces else text.replace(" ", "x")

    return ReportData(
        f"w-{offset}", chunk(MAX_TEXT_CHARS, 3, spaces=False), None, WHEN,
        [Score(chunk(MAX_DOMAIN_CHARS, i * 7, i % 2 == 0), -1e-300 if i % 3 else 1e300,
               0 if i % 5 == 0 else 7, ("low", "moderate", "high")[i % 3])
         for i in range(MAX_SCORES)],
        chunk(MAX_TEXT_CHARS, 11, spaces=False),
        [chunk(MAX_TEXT_CHARS, 100 + i * 13, i % 2 == 0) for i in range(MAX_RECOMMENDATIONS)])


def test_the_worst_accepted_report_opens_and_holds_all_its_text(fonts: Fonts) -> None:
    data = _worst(0)
    check_report_size(data)  # accepted: at the caps, not over
    pdf = _render(data, fonts)
    text = _poppler("pdftotext", pdf, "-enc", "UTF-8")
    letters = _letters(re.sub(r"Page \d+ of \d+", "", text))  # a text may go over a page
    for item in [data.summary or "", *data.recommendations, *(s.domain for s in data.scores)]:
        assert _letters(item) in letters
    pages = re.search(r"^Pages:\s+(\d+)$", _poppler("pdfinfo", pdf), re.MULTILINE)
    assert pages is not None
    assert int(pages[1]) > 1
    assert _rasterise(pdf, 10) == int(pages[1])


def test_renders_in_threads_with_disjoint_glyphs_after_an_abandoned_one_match_sequential(
        fonts: Fonts) -> None:
    """A render abandoned by its timeout goes on in its thread while two others, of disjoint
    glyph sets, run at once: each PDF is byte for byte the one rendered alone, and no glyph
    or text of one report is in another."""
    latin = ReportData("a-1", "Zoë Łukasiewicz-Núñez", None, WHEN, [Score("Focus", 3, 20, "low")],
                       "Quiet week; swimming costs 5 € a week. 😀", ["Ask Dr. Øberg."])
    cyrillic = ReportData("b-1", "Маша Петрова", None, WHEN, [Score("Сон", 8, 20, "low")],
                          "Спит хорошо, устаёт к вечеру. 孩子", ["Режим сна и прогулки."])
    alone = {"en": _render(latin, fonts), "ru": _render(cyrillic, fonts, "ru")}
    abandoned_done = threading.Event()

    def abandoned() -> bytes:
        try:
            return _render(_worst(40), fonts)
        finally:
            abandoned_done.set()

    async def main() -> dict[str, bytes]:
        with trio.move_on_after(0.001):  # the job's timeout, mid-render
            await in_worker_thread(abandoned, abandon_on_cancel=True)
        got: dict[str, bytes] = {}

        async def one(key: str, data: ReportData) -> None:
            got[key] = await in_worker_thread(_render, data, fonts, key)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "en", latin)
            nursery.start_soon(one, "ru", cyrillic)
        return got

    got = trio.run(main)
    assert abandoned_done.wait(timeout=120)
    assert got == alone
    en_text, ru_text = (_fold(_poppler("pdftotext", got[key], "-enc", "UTF-8"))
                        for key in ("en", "ru"))
    assert "Zoë Łukasiewicz-Núñez" in en_text
    assert "Маша Петрова" in ru_text
    assert not set("ëŁúñ€Ø") & set(ru_text)
    assert not set("МашПтрв") & set(en_text)
    en_glyphs, ru_glyphs = outlined(got["en"]), outlined(got["ru"])
    assert not set("ëŁúñ€Ø") & ru_glyphs
    assert not set("МашПтрв") & en_glyphs
    assert en_glyphs >= set("ëŁúñ€Ø")
    assert ru_glyphs >= set("МашПтрв")


def test_a_wording_file_replaced_with_its_mtime_kept_is_read_again(
        fonts: Fonts, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR / "report", templates / "report")
    words = templates / "report" / "en.toml"
    data = ReportData("e-1", "Zoë", None, WHEN, [], None, [])
    assert "Checkup report" in _poppler("pdftotext", _render(data, fonts, "en", templates))
    before = words.stat()
    replacement = tmp_path / "en.toml"
    replacement.write_text(words.read_text(encoding="utf-8").replace(
        'title = "Checkup report"', 'title = "Checkup digest"'), encoding="utf-8")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    replacement.replace(words)  # same size, same mtime, another file
    text = _poppler("pdftotext", _render(data, fonts, "en", templates))
    assert "Checkup digest" in text


# -- 6. shutdown while the take is held up ---------------------------------------------------
async def test_shutdown_during_a_take_held_by_a_lock_ends_soon_after_the_grace(
        database_url: str) -> None:
    with psycopg.connect(database_url) as locker:
        async with running_reactor(database_url, _only(scripted_processor()),
                                   SHUTDOWN_GRACE_S=1, DB_STATEMENT_TIMEOUT_S=60) as reactor:
            await eventually(lambda: reactor.drainers[QUEUE].idle, within_s=20)
            locker.execute("LOCK TABLE pgmq.q_analytics_queue IN ACCESS EXCLUSIVE MODE")
            await sql(database_url, "SELECT pg_notify('reactor_wakeup', 'analytics_queue')")

            async def take_waits_on_the_lock() -> bool:
                return await _count(database_url, "SELECT count(*) FROM pg_stat_activity "
                                    "WHERE application_name = 'reactor' AND "
                                    "wait_event_type = 'Lock'") > 0

            await eventually(take_waits_on_the_lock, within_s=20)
            reactor.stop()
            with trio.move_on_after(10) as late:  # the grace (1 s) and the final flush (5 s)
                await reactor.drainers[QUEUE].finished.wait()
            locker.rollback()  # lets a stuck take (and the test) finish either way
    assert not late.cancelled_caught
