"""The checkup report's layout (fpdf2), in Russian or English.

Wording comes from `templates/report/<locale>.toml` and colours and sizes
from `templates/report/style.toml`, so a wording change needs no code
change; both are parsed once per file version (`_load`).

Drawn through fpdf2's public API only: `add_font` for each document (from the
subsets `fonts.prepare_fonts` made), fpdf2's own line breaking, subsetting and
output. That costs more than the font sharing and embedding this module once did
by hand through fpdf2's internals (issue 26): fpdf2 parses both fonts for every
document, subsets and recompiles them with fontTools on output, and measures the
whole line so far for each character it breaks. `python -m bench pdf`, before and
after, back to back on one loaded 2-core machine: the standard report 34 -> 149 ms
of CPU, the worst accepted one 1.36 -> 2.06 s (docs/benchmarks.md); keeping the
glyph boxes (`_keep_glyph_boxes`) took a third off the standard report. Kept so: a
report is rendered once per completed checkup, in a worker thread, and no one
waits on it.

The scale: more points mean more signs of difficulty, so a long red bar is a
reason for attention, not good news. Every report with scores says so before
the bars (a legend of the scale and of the colours), and the band words name
a level *of difficulty*, in every locale.
"""

from __future__ import annotations

import threading
import tomllib
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_date
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from reactor.clinic.services.pdf.data import ReportData
from reactor.clinic.services.pdf.fonts import Fonts, log_missing_glyphs, present

__all__ = ["render_report"]

_LOCK = threading.Lock()          # guards _wording (not the renders)
_CACHE_SIZE = 8                   # wording files kept; LRU beyond that
_FileKey = tuple[str, int, int, int, int]


def _file_key(path: Path) -> _FileKey:
    """A file as its content goes: replaced or edited, it is a new key. The inode and
    ctime see a replacement that kept size and mtime (cp -p, rsync -t, tar): ctime
    cannot be set back."""
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


# The wording and style, by file version.
_wording: OrderedDict[tuple[_FileKey, _FileKey],
                      tuple[dict[str, Any], dict[str, Any]]] = OrderedDict()


def _load(templates_dir: Path, locale: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The wording and style, parsed once per file version (an edit is seen at once).

    The dicts are shared between documents and threads: callers only read them.
    """
    folder = templates_dir / "report"
    words_path, style_path = folder / f"{locale}.toml", folder / "style.toml"
    key = (_file_key(words_path), _file_key(style_path))
    with _LOCK:
        found = _wording.get(key)
    if found is not None:
        return found
    with words_path.open("rb") as words, style_path.open("rb") as st:
        loaded = tomllib.load(words), tomllib.load(st)
    with _LOCK:
        _remember(_wording, key, loaded)
    return loaded


class _Report(FPDF):
    footer_text = ""
    muted: tuple[int, int, int] = (123, 135, 148)
    small = 8.5

    def footer(self) -> None:
        self.set_y(-14)
        self.set_font("DejaVu", size=self.small)
        self.set_text_color(*self.muted)
        self.cell(0, 6, self.footer_text.format(page=self.page_no(), pages="{nb}"),
                  align="C")


def _legend(pdf: FPDF, words: dict[str, Any], colors: dict[str, Any],
            sizes: dict[str, Any]) -> None:
    """How to read the bars, before them: a high score means more difficulty, which a
    parent could otherwise take for good news (red bar, "high level")."""
    width = pdf.epw
    if words.get("legend_heading"):
        pdf.set_font("DejaVu", "B", sizes["small"])
        pdf.set_text_color(*colors["text"])
        pdf.cell(width, 5, words["legend_heading"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", "", sizes["small"])
    if words.get("scale_note"):
        pdf.multi_cell(width, 4.4, words["scale_note"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_text_color(*colors["muted"])
    meanings = words.get("legend", {})
    for band in ("low", "moderate", "high"):
        y = pdf.get_y() + 0.8
        pdf.set_fill_color(*colors[band])
        pdf.rect(pdf.l_margin, y + 0.6, 6, 3, style="F")
        pdf.set_xy(pdf.l_margin + 8, y)
        label = words["bands"][band]
        line = f"{label} — {meanings[band]}" if meanings.get(band) else label
        pdf.multi_cell(width - 8, 4.2, line, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    pdf.set_draw_color(*colors["bar_background"])
    pdf.set_line_width(0.3)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.l_margin + width, pdf.get_y())
    pdf.ln(3)


def _keep_glyph_boxes(pdf: FPDF) -> None:
    """Embed the fonts' glyphs with the bounding boxes they were prepared with.

    fpdf2 subsets each font on output with fontTools and saves it; fontTools then, by
    default (`TTFont.recalcBBoxes`, a public attribute of the fontTools font fpdf2 keeps
    as `ttfont`), unpacks and recompiles every glyph to compute its box again, a third of
    a standard report's CPU. Subsetting never changes an outline, so the boxes already
    stored (computed when `fonts.prepare_fonts` saved the file) are the same ones:
    rendered pages are identical (tests/clinic/reports, pdftoppm)."""
    for font in pdf.fonts.values():
        ttfont = getattr(font, "ttfont", None)  # a core font has none
        if ttfont is not None:
            ttfont.recalcBBoxes = False


def render_report(data: ReportData, *, locale: str, fonts: Fonts, templates_dir: Path,
                  app_name: str, timezone: str = "Europe/Moscow",
                  now: datetime | None = None) -> bytes:
    """The report as PDF bytes (A4, page numbers, title/author/creation date)."""
    words, style = _load(templates_dir, locale)
    colors = {k: tuple(v) for k, v in style["colors"].items()}
    sizes = style["sizes"]
    tz = ZoneInfo(timezone)
    created = (now or datetime.now(tz)).astimezone(tz)

    pdf = _Report(format="A4", unit="mm")
    pdf.footer_text = words["page"]
    pdf.muted = colors["muted"]
    pdf.small = sizes["small"]
    fonts = present(fonts)
    pdf.add_font("DejaVu", "", fonts.regular)
    pdf.add_font("DejaVu", "B", fonts.bold)
    _keep_glyph_boxes(pdf)
    pdf.set_title(f"{words['title']}: {data.child_name or data.assessment_id}")
    pdf.set_author(app_name)
    pdf.set_creator(app_name)
    pdf.set_creation_date(created)
    pdf.set_lang(locale)
    pdf.set_margins(18, 18, 18)
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.add_page()
    width = pdf.epw

    def text(size: float, color: str = "text", bold: bool = False) -> None:
        pdf.set_font("DejaVu", "B" if bold else "", size)
        pdf.set_text_color(*colors[color])

    # Header: service name and date, then the title.
    text(sizes["small"], "muted")
    pdf.cell(width / 2, 6, app_name)
    pdf.cell(width / 2, 6, f"{words['date_label']}: {format_date(created, 'long', locale=locale)}",
             align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_draw_color(*colors["accent"])
    pdf.set_line_width(0.6)
    pdf.line(pdf.l_margin, pdf.get_y() + 1, pdf.l_margin + width, pdf.get_y() + 1)
    pdf.ln(6)
    text(sizes["title"], "accent", bold=True)
    pdf.multi_cell(width, 9, words["title"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(1)
    text(sizes["body"])
    if data.child_name:
        pdf.multi_cell(width, 6, f"{words['child_label']}: {data.child_name}",
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if data.completed_at:
        done = format_date(data.completed_at.astimezone(tz), "long", locale=locale)
        pdf.multi_cell(width, 6, f"{words['completed_label']}: {done}",
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)

    # One row per domain: name, score, and a bar coloured by band.
    text(sizes["heading"], "accent", bold=True)
    pdf.cell(width, 8, words["scores_heading"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if not data.scores:
        text(sizes["body"], "muted")
        pdf.multi_cell(width, 6, words["no_scores"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    else:
        _legend(pdf, words, colors, sizes)
    name_w, score_w = width * 0.38, width * 0.14
    bar_w = width - name_w - score_w - 4
    for score in data.scores:
        if pdf.will_page_break(12):
            pdf.add_page()
        y = pdf.get_y()
        text(sizes["body"])
        pdf.set_xy(pdf.l_margin, y)
        pdf.multi_cell(name_w, 5.5, score.domain, new_x=XPos.RIGHT, new_y=YPos.TOP)
        row_bottom = pdf.get_y()
        pdf.set_xy(pdf.l_margin + name_w, y)
        pdf.cell(score_w, 5.5, f"{score.score:g} / {score.max:g}", align="R")
        bar_x = pdf.l_margin + name_w + score_w + 4
        bar_h = sizes["bar_height"]
        pdf.set_fill_color(*colors["bar_background"])
        pdf.rect(bar_x, y + 0.6, bar_w, bar_h, style="F")
        share = 0.0 if score.max <= 0 else max(0.0, min(1.0, score.score / score.max))
        pdf.set_fill_color(*colors.get(score.band, colors["muted"]))
        if share > 0:
            pdf.rect(bar_x, y + 0.6, bar_w * share, bar_h, style="F")
        text(sizes["small"], "muted")
        pdf.set_xy(bar_x, y + bar_h + 0.8)
        pdf.cell(bar_w, 4, words["bands"].get(score.band, score.band))
        pdf.set_y(max(row_bottom, y + bar_h + 5.5) + 2.5)
    pdf.ln(2)

    text(sizes["heading"], "accent", bold=True)
    pdf.cell(width, 8, words["summary_heading"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    text(sizes["body"])
    pdf.multi_cell(width, 5.8, data.summary or "—", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(3)

    text(sizes["heading"], "accent", bold=True)
    pdf.cell(width, 8, words["recommendations_heading"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    text(sizes["body"])
    if not data.recommendations:
        pdf.multi_cell(width, 5.8, words["no_recommendations"], new_x=XPos.LMARGIN,
                       new_y=YPos.NEXT)
    for item in data.recommendations:
        pdf.multi_cell(width, 5.8, f"•  {item}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(0.8)
    pdf.ln(4)

    # The disclaimer, in a tinted box.
    text(sizes["small"], "muted")
    pdf.set_fill_color(244, 245, 247)
    pdf.multi_cell(width, 4.8, words["disclaimer"], fill=True, padding=3,
                   new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    out = bytes(pdf.output())
    for font in pdf.fonts.values():
        log_missing_glyphs(font.name, getattr(font, "missing_glyphs", []))
    return out
