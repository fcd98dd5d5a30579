"""Email templates: every template in both locales, formatting, and clean failures."""

from __future__ import annotations

from typing import Any

import pytest

from reactor.paths import TEMPLATES_DIR
from reactor.processors.base import PermanentError
from reactor.services.templates import LOCALES, REQUIRED_VARIABLES, EmailRenderer

VALUES: dict[str, Any] = {
    "full_name": "Анна Петрова", "specialist_name": "Dr. Ivanova",
    "scheduled_at": "2026-11-27T12:00:00+00:00", "duration_minutes": 50,
    "appointment_id": "9f1c", "assessment_id": "7a2b", "amount": "3500.00", "currency": "RUB",
}


@pytest.fixture(scope="module")
def renderer() -> EmailRenderer:
    return EmailRenderer(TEMPLATES_DIR, app_base_url="https://app.example.com/")


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("template", sorted(REQUIRED_VARIABLES))
def test_each_template_renders_in_each_locale(renderer: EmailRenderer, template: str,
                                              locale: str) -> None:
    variables = {name: VALUES[name] for name in REQUIRED_VARIABLES[template]}
    mail = renderer.render(template, locale, variables)
    assert mail.subject
    assert "\n" not in mail.subject
    assert "Анна Петрова" in mail.text
    assert "Анна Петрова" in mail.html
    assert mail.html.lstrip().startswith("<!doctype html>")
    assert f'lang="{locale}"' in mail.html
    if locale == "ru":
        assert "Здравствуйте" in mail.text
    else:
        assert "Hello" in mail.text


@pytest.mark.parametrize("template", sorted(REQUIRED_VARIABLES))
def test_a_missing_variable_is_permanent_and_named(renderer: EmailRenderer,
                                                   template: str) -> None:
    required = REQUIRED_VARIABLES[template]
    variables = {name: VALUES[name] for name in required[1:]}
    with pytest.raises(PermanentError, match=f"needs variable\\(s\\) {required[0]}"):
        renderer.render(template, "ru", variables)


def test_unknown_template_and_locale_are_permanent(renderer: EmailRenderer) -> None:
    with pytest.raises(PermanentError, match="unknown template 'welcome_pack'"):
        renderer.render("welcome_pack", "ru", {})
    with pytest.raises(PermanentError, match="unknown locale 'de'"):
        renderer.render("checkup_completed", "de", {"full_name": "x", "assessment_id": "y"})


def test_dates_and_money_follow_locale_and_client_time_zone(renderer: EmailRenderer) -> None:
    variables = {name: VALUES[name] for name in REQUIRED_VARIABLES["payment_confirmation"]}
    ru = renderer.render("payment_confirmation", "ru", variables)
    en = renderer.render("payment_confirmation", "en", variables)
    # 12:00 UTC is 15:00 in Moscow.
    assert "27 ноября 2026, 15:00" in ru.text
    assert "November 27, 2026, 3:00" in en.text
    assert "3\xa0500,00\xa0₽" in ru.text
    assert "3,500.00" in en.text


def test_html_is_escaped_and_the_subject_stays_one_line(renderer: EmailRenderer) -> None:
    variables = {"full_name": "<script>x</script>", "assessment_id": "1"}
    mail = renderer.render("checkup_completed", "en", variables,
                           subject=None)
    assert "<script>" not in mail.html
    assert "&lt;script&gt;" in mail.html
    nasty = {**{n: VALUES[n] for n in REQUIRED_VARIABLES["payment_failed"]}}
    subject = renderer.render("payment_failed", "en", nasty, subject="Hi\tthere  you").subject
    assert subject == "Hi there you"


def test_links_appear_only_with_app_base_url() -> None:
    variables = {name: VALUES[name] for name in REQUIRED_VARIABLES["appointment_confirmation"]}
    with_url = EmailRenderer(TEMPLATES_DIR, app_base_url="https://app.example.com")
    without = EmailRenderer(TEMPLATES_DIR)
    assert "https://app.example.com/appointments/9f1c" in with_url.render(
        "appointment_confirmation", "en", variables).html
    assert "<a href" not in without.render("appointment_confirmation", "en", variables).html
