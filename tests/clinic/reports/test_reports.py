"""Checkup reports: a completed checkup yields a PDF, a reports row and a mail."""

from __future__ import annotations

import email.policy
import hashlib
import io
import struct
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from pypdf import PdfReader
from structlog.testing import capture_logs

from reactor.clinic.app import build
from reactor.clinic.resources import TEMPLATES_DIR
from reactor.clinic.services.pdf import ReportData, Score, find_fonts, prepare_fonts, render_report
from reactor.clinic.services.templates import EmailRenderer
from reactor.clinic.settings import ConfigError
from reactor.engine.runtime import Reactor
from tests import factories as f
from tests.harness import CHECKOUT, of_type, running_reactor, settings_for, sql, wait_for

RESULTS = {
    "child_name": "Маша Петрова",
    "scores": [
        {"domain": "Эмоциональное состояние", "score": 12, "max": 20, "band": "moderate"},
        {"domain": "Поведение", "score": 5, "max": 20, "band": "low"},
        {"domain": "Внимание и концентрация", "score": 18, "max": 20, "band": "high"},
    ],
    "summary": "Ребёнок в целом справляется, но стоит обратить внимание на концентрацию.",
    "recommendations": ["Обсудить режим сна со специалистом.", "Ежедневные прогулки."],
}


def pdf_text(data: bytes) -> tuple[int, str, dict[str, str]]:
    reader = PdfReader(io.BytesIO(data))
    # Whitespace folded: line breaks and justified spacing differ from the source text.
    text = " ".join(" ".join(page.extract_text() for page in reader.pages).split())
    meta = {k: str(v) for k, v in (reader.metadata or {}).items()}
    return len(reader.pages), text, meta


async def test_completed_checkup_yields_pdf_row_and_mail(database_url: str,
                                                         tmp_path: Path) -> None:
    reports, outbox = tmp_path / "reports", tmp_path / "outbox"
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn, email="mama@example.com", full_name="Анна Петрова", locale="ru")
        checkup = f.assessment(conn, user, results=RESULTS)
    async with running_reactor(database_url, REPORTS_DIR=str(reports),
                               EMAIL_OUTBOX_DIR=str(outbox)) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "UPDATE public.assessments SET status = 'completed' "
                                    "WHERE id = %s", (checkup,))
            # The report, and two mails: "checkup completed" (trigger), "report ready".
            done = await wait_for(sub, lambda e: e["type"] == "job.succeeded" and e["queue"] in (
                "report_generation_queue", "email_queue"), count=3, within_s=15)
    assert sorted(e["queue"] for e in done) == ["email_queue", "email_queue",
                                                "report_generation_queue"]
    path = reports / str(user) / f"{checkup}.pdf"
    data = path.read_bytes()
    pages, text, meta = pdf_text(data)
    assert pages == 1
    assert "Маша Петрова" in text
    assert "Отчёт по результатам чекапа" in text
    assert "Внимание и концентрация" in text
    assert "не является диагнозом" in text
    assert "Страница 1 из 1" in text
    assert meta["/Author"] == "Family Mind"
    assert "Маша Петрова" in meta["/Title"]
    assert "/CreationDate" in meta
    [(rel, size, sha)] = await sql(database_url, "SELECT path, bytes, sha256 FROM public.reports")
    assert (rel, size) == (f"{user}/{checkup}.pdf", len(data))
    assert sha == hashlib.sha256(data).hexdigest()
    mails = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
             for p in sorted(outbox.glob("*.eml"))]
    [ready] = [m for m in mails if m["Subject"] == "Отчёт по чекапу готов"]
    [attachment] = list(ready.iter_attachments())
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == data


async def test_the_same_message_twice_gives_one_row_one_file_one_mail(
        database_url: str, tmp_path: Path) -> None:
    reports, outbox = tmp_path / "reports", tmp_path / "outbox"
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn, locale="en")
        checkup = f.assessment(conn, user, status="completed", results=RESULTS)
        conn.execute("DELETE FROM pgmq.q_email_queue")
        # The same job delivered again (e.g. the first worker died before archiving).
        conn.execute("SELECT public.queue_report_generation(%s, %s)", (checkup, user))
    async with running_reactor(database_url, REPORTS_DIR=str(reports),
                               EMAIL_OUTBOX_DIR=str(outbox)) as reactor:
        with reactor.bus.subscribe() as sub:
            await wait_for(sub, lambda e: e["type"] == "job.succeeded" and e["queue"] in (
                "report_generation_queue", "email_queue"), count=3, within_s=20)
    assert await sql(database_url, "SELECT count(*) FROM public.reports") == [(1,)]
    assert len(list((reports / str(user)).iterdir())) == 1  # no temp file left either
    assert len(list(outbox.glob("*.eml"))) == 1
    assert "Checkup report" in pdf_text((reports / str(user) / f"{checkup}.pdf").read_bytes())[1]


@pytest.mark.parametrize(("setup", "reason"), [
    ("missing", "does not exist"),
    ("in_progress", "is in_progress, not completed"),
])
async def test_missing_or_unfinished_checkup_is_dead_lettered(
        database_url: str, tmp_path: Path, setup: str, reason: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn)
        checkup = f.assessment(conn, user) if setup == "in_progress" else user
    async with running_reactor(database_url, REPORTS_DIR=str(tmp_path)) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT public.queue_report_generation(%s, %s)",
                      (checkup, user))
            [event] = await wait_for(sub, of_type("job.dead_lettered"))
    assert reason in event["error"]
    assert await sql(database_url, "SELECT count(*) FROM public.reports") == [(0,)]


async def test_a_report_asked_for_another_user_is_dead_lettered_and_never_written(
        database_url: str, tmp_path: Path) -> None:
    reports, outbox = tmp_path / "reports", tmp_path / "outbox"
    with psycopg.connect(database_url, autocommit=True) as conn:
        owner = f.profile(conn, email="owner@example.com")
        other = f.profile(conn, email="other@example.com")
        checkup = f.assessment(conn, owner, status="completed", results=RESULTS)
        conn.execute("DELETE FROM pgmq.q_report_generation_queue")  # the trigger's own job
        conn.execute("DELETE FROM pgmq.q_email_queue")
    async with running_reactor(database_url, REPORTS_DIR=str(reports),
                               EMAIL_OUTBOX_DIR=str(outbox)) as reactor:
        with reactor.bus.subscribe() as sub:
            await sql(database_url, "SELECT public.queue_report_generation(%s, %s)",
                      (checkup, other))
            [event] = await wait_for(sub, of_type("job.dead_lettered"))
    assert event["attempt"] == 1
    assert f"checkup {checkup} belongs to another user" in event["error"]
    assert await sql(database_url, "SELECT count(*) FROM public.reports") == [(0,)]
    assert not reports.exists() or list(reports.rglob("*.pdf")) == []
    assert not outbox.exists() or list(outbox.glob("*.eml")) == []  # no "report ready" mail


@pytest.mark.parametrize(("status", "attempts", "reason"), [
    # A refused key is an outage (someone must fix the setting): OUTAGE_MAX_ATTEMPTS (3),
    # not MAX_ATTEMPTS (1), then a dead letter saying which setting to check.
    (401, 3, "Storage refused the upload: check SUPABASE_SERVICE_ROLE_KEY (HTTP 401)"),
    # A server error is an ordinary failure of this job: MAX_ATTEMPTS.
    (503, 1, "Storage upload failed: HTTP 503"),
])
async def test_storage_refusals_and_errors_are_retried_then_dead_lettered(
        database_url: str, tmp_path: Path, status: int, attempts: int, reason: str) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from reactor.engine.web import serve_http

    calls: list[str] = []

    async def upload(request: Request) -> Response:
        calls.append(request.path_params["path"])
        return PlainTextResponse("no", status_code=status)

    storage = Starlette(routes=[Route("/storage/v1/object/reports/{path:path}", upload,
                                      methods=["POST"])])
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn)
        checkup = f.assessment(conn, user, status="completed", results=RESULTS)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, storage, "127.0.0.1", 0)
        async with running_reactor(database_url, REPORTS_DIR=str(tmp_path),
                                   MAX_ATTEMPTS=1, OUTAGE_MAX_ATTEMPTS=3,
                                   SUPABASE_URL=f"http://127.0.0.1:{port}",
                                   SUPABASE_SERVICE_ROLE_KEY="service-role-key-for-tests"
                                   ) as reactor:
            with reactor.bus.subscribe() as sub:
                [dead] = await wait_for(sub, lambda e: e["type"] == "job.dead_lettered"
                                        and e["queue"] == "report_generation_queue",
                                        within_s=60)
        nursery.cancel_scope.cancel()
    assert dead["attempt"] == attempts
    assert reason in dead["error"]
    assert "service-role-key-for-tests" not in dead["error"]
    assert calls == [f"{user}/{checkup}.pdf"] * attempts
    [(letter,)] = await sql(database_url,
                            "SELECT message FROM pgmq.q_report_generation_queue_dlq")
    assert letter["attempts"] == attempts


def test_a_missing_font_stops_start_up_naming_the_fix(database_url: str,
                                                      tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt-get install -y fonts-dejavu-core"):
        Reactor(build(settings_for(database_url, REPORT_FONT_DIR=str(tmp_path))))


def test_a_missing_pdf_library_stops_start_up_naming_the_package(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fpdf2 is imported by the first report only: a reactor installed without it would
    start and fail every report. It is looked up (not imported) at start instead."""
    monkeypatch.setitem(sys.modules, "fpdf", None)  # how Python marks a module absent
    with pytest.raises(ConfigError, match="reports need the fpdf2 package, which is not "
                                          "installed: reinstall reactor"):
        Reactor(build(settings_for(database_url)))


def test_optional_parts_may_be_missing(tmp_path: Path) -> None:
    fonts = prepare_fonts(find_fonts(Path("/usr/share/fonts/truetype/dejavu")), tmp_path)
    data = ReportData("a1", None, None, None)
    pages, text, _ = pdf_text(render_report(data, locale="en", fonts=fonts,
                                            templates_dir=TEMPLATES_DIR, app_name="X"))
    assert pages == 1
    assert "No scores by area were recorded." in text
    many = ReportData("a2", "Kid", "Parent", datetime.now(UTC) - timedelta(days=1),
                      [Score(f"Area {i}", i, 40, "low") for i in range(40)], "x " * 400,
                      [f"Recommendation {i}" for i in range(30)])
    pages, text, _ = pdf_text(render_report(many, locale="en", fonts=fonts,
                                            templates_dir=TEMPLATES_DIR, app_name="X"))
    assert pages >= 2
    assert f"Page {pages} of {pages}" in text


ARTIFACTS = CHECKOUT / "test-artifacts"
# What the wording must say in each locale: a high score means more difficulty.
DIFFICULTY = {"ru": "признаков трудностей", "en": "signs of difficulty"}


def report_words(locale: str) -> dict[str, Any]:
    with (TEMPLATES_DIR / "report" / f"{locale}.toml").open("rb") as fh:
        return tomllib.load(fh)


def fold(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("locale", ["ru", "en"])
def test_the_report_explains_its_scale_and_colours(tmp_path: Path, locale: str) -> None:
    fonts = prepare_fonts(find_fonts(Path("/usr/share/fonts/truetype/dejavu")), tmp_path)
    words = report_words(locale)
    with (TEMPLATES_DIR / "report" / "style.toml").open("rb") as fh:
        colors = tomllib.load(fh)["colors"]
    data = ReportData("a1", "Маша Петрова", None, datetime.now(UTC), [
        Score("Внимание и концентрация", 17, 20, "high"), Score("Поведение", 6, 20, "low"),
        Score("Сон", 11, 20, "moderate")])
    pdf = render_report(data, locale=locale, fonts=fonts, templates_dir=TEMPLATES_DIR,
                        app_name="Family Mind")
    _, text, _ = pdf_text(pdf)
    # The scale, in words: more points, more difficulty; high is not good news.
    assert DIFFICULTY[locale] in words["scale_note"]
    assert fold(words["legend_heading"]) in text
    assert fold(words["scale_note"]) in text
    for band in ("low", "moderate", "high"):
        assert DIFFICULTY[locale].split()[-1] in words["bands"][band]  # "difficulty" each time
        # The legend line, and the label under the bar of the one score in that band.
        assert fold(f"{words['bands'][band]} — {words['legend'][band]}") in text
        assert text.count(words["bands"][band]) == 2
    # The legend's swatches are the bars' colours: each band's fill is used twice.
    content = PdfReader(io.BytesIO(pdf)).pages[0].get_contents()
    assert content is not None
    ops = content.get_data().decode("latin-1")
    for band in ("low", "moderate", "high"):
        fill = " ".join(f"{c / 255:.4f}".rstrip("0").rstrip(".") for c in colors[band])
        assert ops.count(f"{fill} rg") == 2, (band, fill)
    # A rendered page for a person to look at (test-artifacts/ is not committed).
    ARTIFACTS.mkdir(exist_ok=True)
    source = tmp_path / "report.pdf"
    source.write_bytes(pdf)
    png = ARTIFACTS / f"report-{locale}"
    subprocess.run(["pdftoppm", "-png", "-r", "80", "-singlefile", str(source), str(png)],
                   check=True, timeout=60)
    # An A4 page at 80 dpi (about 661 x 936 pixels), not an empty or broken file.
    head = png.with_suffix(".png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert abs(width - 661) <= 2
    assert abs(height - 936) <= 2


def test_report_wording_has_the_same_parts_in_every_locale() -> None:
    ru, en = report_words("ru"), report_words("en")
    assert ru.keys() == en.keys()
    assert ru["bands"].keys() == en["bands"].keys() == {"low", "moderate", "high"}
    assert ru["legend"].keys() == en["legend"].keys() == {"low", "moderate", "high"}


@pytest.mark.parametrize("locale", ["ru", "en"])
def test_report_ready_mail_reads_the_scale_as_the_report_does(locale: str) -> None:
    mail = EmailRenderer(TEMPLATES_DIR).render(
        "report_ready", locale, {"full_name": "Анна", "assessment_id": "7a2b"})
    high = report_words(locale)["bands"]["high"]
    for part in (mail.text, mail.html):
        assert DIFFICULTY[locale] in fold(part)
        assert high in fold(part)


def test_bad_results_entries_are_skipped() -> None:
    from reactor.clinic.reports import report_data

    data = report_data("a", {"scores": [{"domain": "A", "score": "x"}, "junk",
                                        {"domain": "B", "score": 3, "max": 5, "band": "??"},
                                        {"domain": "C", "score": "nan", "max": 5},
                                        {"domain": "D", "score": 1, "max": "inf"}],
                             "recommendations": None}, None, None)
    # No bar can show "nan" or "inf" (it would be drawn full): skipped like the others.
    assert [(s.domain, s.band) for s in data.scores] == [("B", "moderate")]
    assert data.recommendations == []
    assert report_data("a", None, None, None).scores == []



async def test_reports_are_also_upserted_into_supabase_storage(
        database_url: str, tmp_path: Path) -> None:
    """A local stand-in for the Storage REST API receives the PDF (upsert, service key)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from reactor.engine.web import serve_http

    uploads: list[dict[str, Any]] = []

    async def upload(request: Request) -> Response:
        uploads.append({"path": request.path_params["path"], "body": await request.body(),
                        "auth": request.headers.get("authorization"),
                        "upsert": request.headers.get("x-upsert"),
                        "type": request.headers.get("content-type")})
        return JSONResponse({"Key": f"reports/{request.path_params['path']}"})

    storage = Starlette(routes=[Route("/storage/v1/object/reports/{path:path}", upload,
                                      methods=["POST"])])
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = f.profile(conn)
        checkup = f.assessment(conn, user, status="completed", results=RESULTS)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, storage, "127.0.0.1", 0)
        async with running_reactor(database_url, REPORTS_DIR=str(tmp_path),
                                   SUPABASE_URL=f"http://127.0.0.1:{port}",
                                   SUPABASE_SERVICE_ROLE_KEY="service-role-key-for-tests"
                                   ) as reactor:
            with reactor.bus.subscribe() as sub:
                await wait_for(sub, lambda e: e["type"] == "job.succeeded"
                               and e["queue"] == "report_generation_queue", within_s=15)
        nursery.cancel_scope.cancel()
    [sent] = uploads
    assert sent["path"] == f"{user}/{checkup}.pdf"
    assert sent["body"] == (tmp_path / str(user) / f"{checkup}.pdf").read_bytes()
    assert (sent["auth"], sent["upsert"], sent["type"]) == (
        "Bearer service-role-key-for-tests", "true", "application/pdf")


# -- fonts and wording shared across documents (reactor.clinic.services.pdf caches them) --------
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
WHEN = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
RU_REPORT = ReportData("r-1", "Маша Петрова", "Анна Петрова", WHEN,
                       [Score("Сон", 8, 20, "low"), Score("Внимание", 17, 20, "high")],
                       "Спит хорошо, устаёт к вечеру.", ["Режим сна и прогулки."])
# Letters the Russian report does not use (Latin Extended, Latin-1, €): after it, the
# English report must still draw them.
EN_REPORT = ReportData("e-1", "Zoë Łukasiewicz-Núñez", None, WHEN,
                       [Score("Focus", 17, 20, "high"), Score("Sleep", 3, 20, "low")],
                       "Quiet week; swimming costs 5 € a week.", ["Ask Dr. Øberg about focus."])
ONLY_EN = set("ZëŁkzúñ€ØQ")


def render(data: ReportData, locale: str, fonts: Any, templates_dir: Path = TEMPLATES_DIR,
           ) -> bytes:
    return render_report(data, locale=locale, fonts=fonts, templates_dir=templates_dir,
                         app_name="Family Mind", now=WHEN)


def pdftotext(pdf: bytes) -> str:
    """The text as poppler reads it, whitespace folded."""
    out = subprocess.run(["pdftotext", "-enc", "UTF-8", "-", "-"], input=pdf,
                         capture_output=True, check=True, timeout=60)
    return fold(out.stdout.decode())


def outlined(pdf: bytes) -> set[str]:
    """The characters the embedded regular font can draw: a glyph with an outline, or a
    composite one (an accented letter) whose every part has one."""
    from fontTools.ttLib import TTFont

    def drawn(glyf: Any, name: str) -> bool:
        glyph = glyf[name]
        if glyph.isComposite():
            return all(drawn(glyf, part) for part in glyph.getComponentNames(glyf))
        return bool(glyph.numberOfContours > 0)

    resources: Any = PdfReader(io.BytesIO(pdf)).pages[0]["/Resources"]
    for ref in resources["/Font"].values():
        cid_font = ref.get_object()["/DescendantFonts"][0].get_object()
        if str(cid_font["/BaseFont"]).endswith("Book"):
            program = cid_font["/FontDescriptor"].get_object()["/FontFile2"].get_object()
            # checkChecksums=2: a wrong table checksum in the embedded font is an error.
            font = TTFont(io.BytesIO(program.get_data()), checkChecksums=2)
            return {chr(code) for code, name in font.getBestCmap().items()
                    if drawn(font["glyf"], name)}
    raise AssertionError("no regular DejaVu font in the PDF")


def test_reports_one_after_another_each_hold_their_own_text_and_glyphs(
        tmp_path: Path) -> None:
    fonts = prepare_fonts(find_fonts(DEJAVU), tmp_path)
    ru_first = render(RU_REPORT, "ru", fonts)
    en = render(EN_REPORT, "en", fonts)
    # Nothing the English report did is carried into a later Russian one, byte for byte.
    assert render(RU_REPORT, "ru", fonts) == ru_first
    ru_text, en_text = pdftotext(ru_first), pdftotext(en)
    for text, data, locale in ((ru_text, RU_REPORT, "ru"), (en_text, EN_REPORT, "en")):
        words = report_words(locale)
        assert f"{words['child_label']}: {data.child_name}" in text
        assert fold(data.summary or "") in text
        assert all(item in text for item in data.recommendations)
        assert all(score.domain in text for score in data.scores)
        assert fold(words["legend_heading"]) in text
        assert fold(f"{words['bands']['high']} — {words['legend']['high']}") in text
        assert words["page"].format(page=1, pages=1) in text
        _, _, meta = pdf_text(render(data, locale, fonts))
        assert meta["/Title"] == f"{words['title']}: {data.child_name}"
        assert meta["/Author"] == meta["/Creator"] == "Family Mind"
    assert "Маша" not in en_text
    assert "Zoë" not in ru_text
    # Each font program has outlines for what its document draws, and only that: the
    # English report's letters are absent from the Russian one's and present in its own.
    ru_glyphs, en_glyphs = outlined(ru_first), outlined(en)
    assert en_glyphs >= ONLY_EN
    assert not ONLY_EN & ru_glyphs
    assert ru_glyphs >= set("МашаПетроваСн")
    assert en_glyphs >= set(fold(EN_REPORT.summary or "").replace(" ", ""))


def test_concurrent_renders_give_the_bytes_of_sequential_ones(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    # A new font file: the two threads also race to parse it for the first time.
    fonts = prepare_fonts(find_fonts(DEJAVU), tmp_path)
    long_report = ReportData("l-1", "Маша", None, WHEN,
                             [Score(f"Область {i}", i, 20, "moderate") for i in range(20)],
                             "Длинный текст. " * 60, [f"Совет {i}: " + "гулять. " * 30
                                                      for i in range(10)])
    reports = [(RU_REPORT, "ru"), (EN_REPORT, "en"), (long_report, "ru"), (EN_REPORT, "ru")]
    start = Barrier(2, timeout=60)

    def renders(order: list[int]) -> list[bytes]:
        start.wait()
        return [render(*reports[i], fonts) for i in order]

    orders = ([0, 1, 2, 3, 0, 2, 1, 3], [3, 2, 1, 0, 1, 3, 0, 2])
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(renders, order) for order in orders]
        results = [future.result(timeout=300) for future in futures]
    sequential = [render(*report, fonts) for report in reports]
    for order, got in zip(orders, results, strict=True):
        assert got == [sequential[i] for i in order]
    assert "Zoë Łukasiewicz-Núñez" in pdftotext(sequential[1])


def test_an_edited_report_wording_is_used_at_once(tmp_path: Path) -> None:
    import shutil

    fonts = prepare_fonts(find_fonts(DEJAVU), tmp_path / "fonts")
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR / "report", templates / "report")
    assert "Checkup report" in pdftotext(render(EN_REPORT, "en", fonts, templates))
    words = templates / "report" / "en.toml"
    words.write_text(words.read_text(encoding="utf-8").replace(
        'title = "Checkup report"', 'title = "Family checkup summary"'), encoding="utf-8")
    text = pdftotext(render(EN_REPORT, "en", fonts, templates))
    assert "Family checkup summary" in text
    assert "Checkup report" not in text


def test_reports_still_render_after_a_temp_cleaner_removes_the_prepared_fonts(
        tmp_path: Path) -> None:
    fonts = prepare_fonts(find_fonts(DEJAVU), tmp_path)
    before = render(EN_REPORT, "en", fonts)
    fonts.regular.unlink()
    fonts.bold.unlink()
    assert render(EN_REPORT, "en", fonts) == before


def test_a_name_the_font_cannot_draw_is_not_written_to_the_logs(tmp_path: Path) -> None:
    """The characters a font lacks may spell a child's name: the log says which scripts."""
    fonts = prepare_fonts(find_fonts(Path("/usr/share/fonts/truetype/dejavu")), tmp_path)
    data = ReportData("a1", "王小明", "Parent", None, [Score("Sleep", 3, 10, "low")])
    with capture_logs() as logs:
        pdf = render_report(data, locale="en", fonts=fonts, templates_dir=TEMPLATES_DIR,
                            app_name="X")
    assert pdf.startswith(b"%PDF")
    lacking = [e for e in logs if e["event"] == "report font lacks characters, drawn as boxes"]
    assert lacking
    assert all(e["scripts"] == ["CJK"] and e["count"] == 3 for e in lacking)
    assert not any(ch in repr(logs) for ch in "王小明")
