"""What a checkup report shows (`ReportData`, `Score`): plain data, with no PDF library
behind it, so the app can build and check it without loading fpdf2."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

__all__ = ["Band", "ReportData", "Score"]

Band = Literal["low", "moderate", "high"]


@dataclass(frozen=True)
class Score:
    domain: str
    score: float
    max: float
    band: Band


@dataclass(frozen=True)
class ReportData:
    """What a report shows: `assessments.results` plus who and when."""

    assessment_id: str
    child_name: str | None
    parent_name: str | None
    completed_at: datetime | None
    scores: list[Score] = field(default_factory=list)
    summary: str | None = None
    recommendations: list[str] = field(default_factory=list)
