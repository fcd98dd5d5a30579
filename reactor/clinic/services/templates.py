"""Email templates: `templates/email/<locale>/<name>.{subject,txt,html}.j2`.

HTML is autoescaped and shares one layout; dates and money are formatted
for the locale (Babel) in the client's time zone. A template that does not
exist, or a required variable that is missing, is a `PermanentError`: no
retry can fix the message.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import jinja2
import jinja2.meta
from babel import Locale
from babel.dates import format_datetime, get_timezone_location
from babel.numbers import format_currency, get_currency_symbol

from reactor.engine.errors import PermanentError

__all__ = ["LOCALES", "REQUIRED_VARIABLES", "EmailRenderer", "RenderedEmail"]

LOCALES: Final = ("ru", "en")

_APPOINTMENT = ("full_name", "specialist_name", "scheduled_at", "duration_minutes",
                "appointment_id")
# The variables each template needs (DESIGN.md). A value may be null; the key must be there.
REQUIRED_VARIABLES: Final[dict[str, tuple[str, ...]]] = {
    "appointment_confirmation": _APPOINTMENT,
    "appointment_reminder_24h": _APPOINTMENT,
    "appointment_reminder_1h": _APPOINTMENT,
    "checkup_completed": ("full_name", "assessment_id"),
    "report_ready": ("full_name", "assessment_id"),
    "payment_confirmation": ("full_name", "amount", "currency", "appointment_id", "scheduled_at"),
    "payment_failed": ("full_name", "amount", "currency", "appointment_id"),
}

# An ISO 4217 code: Babel writes an unknown one into the text as it is, subject included.
_CURRENCY: Final = re.compile(r"[A-Za-z]{3}")

_DATETIME_FORMAT = {"ru": "d MMMM y, HH:mm", "en": "MMMM d, y, h:mm a"}
_TIME_FORMAT = {"ru": "HH:mm", "en": "h:mm a"}



@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise PermanentError(f"not a date and time: {value!r}")


class EmailRenderer:
    """Renders one template in one locale; the Jinja environment is built once."""

    def __init__(self, templates_dir: Path, *, timezone: str = "Europe/Moscow",
                 app_name: str = "Family Mind", app_base_url: str | None = None,
                 reply_to: str | None = None) -> None:
        self.tz = ZoneInfo(timezone)
        # Parsed once: Babel otherwise parses the locale name, and looks up the zone's
        # city, on every date it formats (a quarter of a booking mail's render time).
        self._locales = {code: Locale.parse(code) for code in LOCALES}
        self._places = {code: get_timezone_location(self.tz, locale=locale, return_city=True)
                        for code, locale in self._locales.items()}
        self.app_name = app_name
        # Where replies go (SMTP_REPLY_TO): the footer invites replies only when there is one.
        self.reply_to = reply_to
        self.app_url = app_base_url.rstrip("/") if app_base_url else None
        self._subject_names: dict[tuple[str, str], frozenset[str]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(templates_dir / "email"),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                                default_for_string=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,  # templates change with a deploy, not under a running reactor
        )
        # Filters read the locale from the template context, so one environment (and
        # its compiled-template cache) serves every locale.
        self.env.filters["datetime"] = jinja2.pass_context(
            lambda ctx, v: self._datetime(v, ctx["locale"]))
        self.env.filters["time"] = jinja2.pass_context(
            lambda ctx, v: format_datetime(_as_datetime(v), _TIME_FORMAT[ctx["locale"]],
                                           tzinfo=self.tz, locale=self._locales[ctx["locale"]]))
        self.env.filters["money"] = jinja2.pass_context(
            lambda ctx, v, currency: self._money(v, currency, self._locales[ctx["locale"]]))

    def render(self, template: str, locale: str, variables: dict[str, Any],
               subject: str | None = None) -> RenderedEmail:
        """Render subject (unless given), text and HTML.

        Raises:
            PermanentError: unknown template or locale, or a missing variable.
        """
        if locale not in LOCALES:
            raise PermanentError(f"unknown locale {locale!r}: use one of {', '.join(LOCALES)}")
        required = REQUIRED_VARIABLES.get(template)
        if required is None:
            raise PermanentError(f"unknown template {template!r}")
        missing = [name for name in required if name not in variables]
        if missing:
            raise PermanentError(
                f"template {template!r} needs variable(s) {', '.join(missing)}")
        env = self.env
        if subject is None:
            self._check_subject_variables(template, locale, variables)
        context = {**variables, "locale": locale, "app_name": self.app_name,
                   "app_url": self.app_url, "reply_to": self.reply_to}
        try:
            if subject is None:
                subject = env.get_template(f"{locale}/{template}.subject.j2").render(context)
            # A variable may carry a newline; a subject line never does.
            subject = " ".join(subject.split())
            context["subject"] = subject
            # One layout for every text part: no trailing blank lines, one final newline.
            text = env.get_template(f"{locale}/{template}.txt.j2").render(context)
            text = text.rstrip() + "\n"
            html = env.get_template(f"{locale}/{template}.html.j2").render(context)
        except jinja2.TemplateNotFound as exc:
            raise PermanentError(f"template file missing: {exc.name}") from None
        except jinja2.UndefinedError as exc:
            raise PermanentError(f"template {template!r}: {exc.message}") from None
        return RenderedEmail(subject, text, html)

    def _check_subject_variables(self, template: str, locale: str,
                                 variables: dict[str, Any]) -> None:
        """A variable the subject template uses reaches the Subject header: a control
        character in it (CR, LF, NUL, ...) is refused with the variable's name, not
        folded away, since such a value is a bad message, not a name."""
        for name in sorted(self._subject_variables(template, locale)):
            value = variables.get(name)
            if isinstance(value, str) and any(
                    unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
                raise PermanentError(f"variables.{name}: must not contain control characters "
                                     "(CR, LF, NUL...): it goes into the Subject header")

    def _subject_variables(self, template: str, locale: str) -> frozenset[str]:
        """The variables a subject template reads (parsed once per template and locale)."""
        key = (template, locale)
        names = self._subject_names.get(key)
        if names is None:
            name = f"{locale}/{template}.subject.j2"
            try:
                source, _, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
            except jinja2.TemplateNotFound:
                raise PermanentError(f"template file missing: {name}") from None
            names = frozenset(jinja2.meta.find_undeclared_variables(self.env.parse(source)))
            self._subject_names[key] = names
        return names

    def _datetime(self, value: Any, locale: str) -> str:
        when = _as_datetime(value)
        text = format_datetime(when, _DATETIME_FORMAT[locale], tzinfo=self.tz,
                               locale=self._locales[locale])
        return f"{text} ({self._places[locale]})"

    @staticmethod
    def _money(value: Any, currency: Any, locale: Locale) -> str:
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            raise PermanentError(f"not an amount: {value!r}") from None
        code = str(currency or "RUB")
        if not _CURRENCY.fullmatch(code):
            shown = code if len(code) <= 20 else code[:20] + "..."
            raise PermanentError(f"variables.currency: {shown!r} is not a currency code "
                                 "(three letters, e.g. RUB)")
        text = format_currency(amount, code, locale=locale)
        # CLDR's currencySpacing, which Babel does not apply: a currency sign made of
        # letters (RUB, CHF) is set off from the digits by a no-break space, as ICU
        # does: "RUB 4,200.00", not "RUB4,200.00". Symbols ($, ₽) stay attached.
        sign = get_currency_symbol(code, locale=locale)
        if sign and not unicodedata.category(sign[-1]).startswith("S"):
            text = re.sub(f"{re.escape(sign)}(?=\\d)", f"{sign}\u00a0", text)
        if sign and not unicodedata.category(sign[0]).startswith("S"):
            text = re.sub(f"(?<=\\d){re.escape(sign)}", f"\u00a0{sign}", text)
        return text
