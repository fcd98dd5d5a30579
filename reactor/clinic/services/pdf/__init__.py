"""Checkup reports as PDF (fpdf2), in Russian or English.

Wording comes from `templates/report/<locale>.toml` and colours and sizes
from `templates/report/style.toml`, so a wording change needs no code
change. Cyrillic needs a Unicode TTF: DejaVu Sans (`fonts-dejavu-core`).

The scale: more points mean more signs of difficulty, so a long red bar is a
reason for attention, not good news. Every report with scores says so before
the bars (a legend of the scale and of the colours), and the band words name
a level *of difficulty*, in every locale.

The modules, by responsibility:
- `data`: what a report shows (`ReportData`, `Score`);
- `layout`: how it shows it (`render_report`, on fpdf2 and babel);
- `fonts`: finding and preparing the fonts (`find_fonts`, `prepare_fonts`).
This module re-exports what the rest of the app imports from
`reactor.clinic.services.pdf`. `render_report` loads `layout` on first use: fpdf2 and
fontTools take 0.6 s of CPU to import, which a reactor that renders no report (a
replica at start, every CLI command) need not spend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reactor.clinic.services.pdf.data import Band, ReportData, Score
from reactor.clinic.services.pdf.fonts import _UNICODES as _UNICODES
from reactor.clinic.services.pdf.fonts import (
    Fonts,
    check_pdf_libraries,
    find_fonts,
    prepare_fonts,
    private_cache_dir,
)

if TYPE_CHECKING:
    from reactor.clinic.services.pdf.layout import render_report as render_report
else:
    def __getattr__(name: str) -> Any:
        if name == "render_report":
            from reactor.clinic.services.pdf.layout import render_report
            return render_report
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Band", "Fonts", "ReportData", "Score", "check_pdf_libraries", "find_fonts",
           "prepare_fonts", "private_cache_dir", "render_report"]
