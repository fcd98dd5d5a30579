"""report_generation_queue: a completed checkup becomes a PDF report, stored under
REPORTS_DIR (and in Supabase Storage when configured), recorded in
public.reports, and mailed to the family as `report_ready` with the PDF.

Processing a message twice yields one row, one file and one mail: the file is
replaced atomically and durably before the row is written (engine.files), the
row is upserted, and the mail is queued only when the row is new, with an
idempotency key for the email ledger besides.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import psycopg

from reactor.clinic import queries
from reactor.clinic.resources import TEMPLATES_DIR
from reactor.clinic.services.pdf import (
    Band,
    Fonts,
    ReportData,
    Score,
    check_pdf_libraries,
    find_fonts,
    prepare_fonts,
    private_cache_dir,
)
from reactor.clinic.settings import ReportSettings, Settings
from reactor.engine import queues
from reactor.engine.db import in_worker_thread
from reactor.engine.errors import PermanentError, RetryableError
from reactor.engine.files import WriteFailed, swept, write_whole
from reactor.engine.processor import Context, Job, MessageModel, Processor

__all__ = ["ReportMessage", "ReportProcessor", "report_data"]

STORAGE_TIMEOUT_S = 30.0

# What a report may hold. Rendering is CPU-bound and cannot be interrupted, so the
# input is capped to keep every render short (the worst accepted report renders in
# under a second here: docs/operations.md); a checkup beyond these is dead-lettered
# with the reason, never rendered. A real checkup is far below them.
MAX_RESULTS_BYTES = 64 * 1024
MAX_SCORES = 40
MAX_RECOMMENDATIONS = 30
MAX_TEXT_CHARS = 1000      # the summary, a recommendation, a name
MAX_DOMAIN_CHARS = 120     # a score's domain: one line beside its bar


class ReportMessage(MessageModel):
    assessment_id: UUID
    user_id: UUID
    report_type: Literal["pdf"] = "pdf"


def report_data(assessment_id: str, results: Any, parent_name: str | None,
                completed_at: datetime | None) -> ReportData:
    """`assessments.results`, tolerating missing optional parts and odd entries."""
    results = results if isinstance(results, dict) else {}
    scores = []
    for item in results.get("scores") or []:
        if not isinstance(item, dict) or "domain" not in item:
            continue
        try:
            score, top = float(item.get("score", 0)), float(item.get("max", 0))
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(score) and math.isfinite(top)):
            continue  # "nan" / "inf": no bar can show it
        band: Band = item["band"] if item.get("band") in ("low", "moderate", "high") \
            else "moderate"
        scores.append(Score(str(item["domain"]), score, top, band))
    raw_recommendations = results.get("recommendations") or []
    if not isinstance(raw_recommendations, list):
        raw_recommendations = []
    recommendations = [str(r) for r in raw_recommendations if r]
    summary = results.get("summary")
    child = results.get("child_name")
    return ReportData(assessment_id, str(child) if child else None, parent_name, completed_at,
                      scores, str(summary) if summary else None, recommendations)


def check_report_size(data: ReportData) -> None:
    """Refuse a report too big to render in bounded time (see MAX_* above).

    Raises:
        PermanentError: naming what is over which limit.
    """
    if len(data.scores) > MAX_SCORES:
        raise PermanentError(f"checkup has {len(data.scores)} scores, more than the "
                             f"{MAX_SCORES} a report shows: not rendered")
    if len(data.recommendations) > MAX_RECOMMENDATIONS:
        raise PermanentError(f"checkup has {len(data.recommendations)} recommendations, more "
                             f"than the {MAX_RECOMMENDATIONS} a report shows: not rendered")
    texts = [data.summary or "", data.child_name or "", data.parent_name or "",
             *data.recommendations]
    longest = max(map(len, texts))
    if longest > MAX_TEXT_CHARS:
        raise PermanentError(f"checkup has a text of {longest} characters, more than the "
                             f"{MAX_TEXT_CHARS} a report shows: not rendered")
    domain = max((len(s.domain) for s in data.scores), default=0)
    if domain > MAX_DOMAIN_CHARS:
        raise PermanentError(f"checkup has a domain name of {domain} characters, more than "
                             f"the {MAX_DOMAIN_CHARS} a report shows: not rendered")


class ReportProcessor(Processor[ReportMessage]):
    settings: Settings
    report: ReportSettings  # what it reads of the settings: its own part
    model = ReportMessage
    concurrency = 2  # CPU-bound: rendering runs in a worker thread
    timeout_s = 120.0

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.report = settings = self.settings
        self.source_fonts = find_fonts(settings.report_font_dir)  # ConfigError if missing
        check_pdf_libraries()  # present, though imported only by the first report
        self.fonts: Fonts | None = None
        key = settings.supabase_service_role_key
        self.storage_key = key.get_secret_value() if key else None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        cache = private_cache_dir(Path(tempfile.gettempdir()))
        self.fonts = await in_worker_thread(prepare_fonts, self.source_fonts, cache)
        # What a crash mid-write left in REPORTS_DIR: at start, then every hour.
        async with swept(self.report.reports_dir):
            yield

    async def handle(self, job: Job[ReportMessage]) -> None:
        msg = job.message
        row = await self.db.run(lambda c: c.execute(
            queries.LOAD_CHECKUP,
            {"assessment_id": msg.assessment_id, "max_bytes": MAX_RESULTS_BYTES}).fetchone())
        if row is None:
            raise PermanentError(f"checkup {msg.assessment_id} does not exist")
        status, user_id, completed_at, results_text, results_bytes, email, full_name, locale = row
        if results_bytes is not None and results_bytes > MAX_RESULTS_BYTES:
            raise PermanentError(f"checkup results are {results_bytes} bytes, more than the "
                                 f"{MAX_RESULTS_BYTES} a report shows: not rendered")
        results, problem = queues.decode_body(results_text, results_bytes) \
            if results_text is not None else (None, None)
        if problem:
            raise PermanentError(f"checkup results cannot be read: {problem}")
        if status != "completed":
            raise PermanentError(f"checkup {msg.assessment_id} is {status}, not completed")
        if user_id != msg.user_id:
            raise PermanentError(f"checkup {msg.assessment_id} belongs to another user")
        data = report_data(str(msg.assessment_id), results, full_name, completed_at)
        check_report_size(data)
        fonts = self.fonts
        assert fonts is not None, "ReportProcessor used outside running()"

        def render() -> bytes:
            # fpdf2 and fontTools load with the first report, in this worker thread: a
            # reactor that renders none never spends their 0.6 s of import.
            from reactor.clinic.services.pdf.layout import render_report
            return render_report(data, locale=locale, fonts=fonts, templates_dir=TEMPLATES_DIR,
                                 app_name=self.report.app_name,
                                 timezone=self.report.app_timezone)

        # Abandoned on timeout or shutdown: the render is a pure computation, and the
        # caps above bound how long the thread goes on after that.
        pdf = await in_worker_thread(render, abandon_on_cancel=True)
        relative = f"{user_id}/{msg.assessment_id}.pdf"
        await self._store(relative, pdf)
        if self.report.supabase_url and self.storage_key:
            await self._upload(relative, pdf)
        mail = {
            "to": email, "subject": None, "template": "report_ready", "priority": 3,
            "locale": locale, "idempotency_key": f"report_ready:{msg.assessment_id}",
            "variables": {"full_name": full_name, "assessment_id": str(msg.assessment_id)},
            "attachments": [{"path": relative, "content_type": "application/pdf",
                             "filename": f"report-{msg.assessment_id}.pdf"}],
        }
        params = {"assessment_id": msg.assessment_id, "user_id": user_id, "path": relative,
                  "bytes": len(pdf), "sha256": hashlib.sha256(pdf).hexdigest()}

        def record(conn: psycopg.Connection) -> None:
            with conn.transaction():
                [inserted] = conn.execute(queries.UPSERT_REPORT, params).fetchone() or [False]
                if inserted:
                    queues.enqueue(conn, "email_queue", mail)

        await self.db.run(record)

    async def _store(self, relative: str, pdf: bytes) -> None:
        """Write whole and durably (engine.files): a reader sees the old file or the new
        one, never half, and the row recorded after this never outlives the file."""
        try:
            await write_whole(self.report.reports_dir / relative, pdf)
        except WriteFailed as exc:
            raise RetryableError(f"cannot write to REPORTS_DIR ({exc.directory}): "
                                 f"{exc.reason}", outage=True) from None

    async def _upload(self, relative: str, pdf: bytes) -> None:
        """Upsert the PDF into the Storage bucket REPORTS_BUCKET (Storage REST API)."""
        base = str(self.report.supabase_url).rstrip("/")
        url = f"{base}/storage/v1/object/{self.report.reports_bucket}/{relative}"
        headers = {"Authorization": f"Bearer {self.storage_key}", "apikey": str(self.storage_key),
                   "Content-Type": "application/pdf", "x-upsert": "true"}
        import httpx  # with the first upload, not at start (REPORTS_STORAGE=local needs none)

        try:
            async with httpx.AsyncClient(timeout=STORAGE_TIMEOUT_S) as client:
                response = await client.post(url, content=pdf, headers=headers)
        except httpx.HTTPError as exc:
            raise RetryableError(f"Storage upload failed: {exc}", outage=True) from None
        if response.status_code in (401, 403):
            raise RetryableError("Storage refused the upload: check SUPABASE_SERVICE_ROLE_KEY "
                                 f"(HTTP {response.status_code})", outage=True)
        if response.status_code >= 400:
            raise RetryableError(f"Storage upload failed: HTTP {response.status_code} "
                                 f"{response.text[:200]}")

