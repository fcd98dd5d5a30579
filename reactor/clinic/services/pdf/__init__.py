"""Checkup reports as PDF (fpdf2), in Russian or English.

Wording comes from `templates/report/<locale>.toml` and colours and sizes
from `templates/report/style.toml`, so a wording change needs no code
change. Cyrillic needs a Unicode TTF: DejaVu Sans (`fonts-dejavu-core`).

The scale: more points mean more signs of difficulty, so a long red bar is a
reason for attention, not good news. Every report with scores says so before
the bars (a legend of the scale and of the colours), and the band words name
a level *of difficulty*, in every locale.

The modules, by responsibility:
- `layout`: what a report shows and how (`ReportData`, `Score`, `render_report`);
- `fonts`: finding and preparing the fonts (`find_fonts`, `prepare_fonts`).
This module re-exports what the rest of the app imports from
`reactor.clinic.services.pdf`.
"""

from __future__ import annotations

from reactor.clinic.services.pdf.fonts import _UNICODES as _UNICODES
from reactor.clinic.services.pdf.fonts import Fonts, find_fonts, prepare_fonts, private_cache_dir
from reactor.clinic.services.pdf.layout import Band, ReportData, Score, render_report

__all__ = ["Band", "Fonts", "ReportData", "Score", "find_fonts", "prepare_fonts",
           "private_cache_dir", "render_report"]
