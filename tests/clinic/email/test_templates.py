"""Email templates: every template in both locales, formatting, and clean failures."""

from __future__ import annotations

from typing import Any

import pytest

from reactor.clinic.resources import TEMPLATES_DIR
from reactor.clinic.services.templates import LOCALES, REQUIRED_VARIABLES, EmailRenderer
from reactor.engine.processor import PermanentError

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
    # Line breaks of any kind (a header injection attempt) and tabs fold into one space.
    subject = renderer.render("payment_failed", "en", nasty,
                              subject="Hi\r\nBcc: x@example.com\n\tthere  you\u2028!").subject
    assert subject == "Hi Bcc: x@example.com there you !"
    assert "\n" not in subject
    assert "\r" not in subject


def test_links_appear_only_with_app_base_url() -> None:
    variables = {name: VALUES[name] for name in REQUIRED_VARIABLES["appointment_confirmation"]}
    with_url = EmailRenderer(TEMPLATES_DIR, app_base_url="https://app.example.com")
    without = EmailRenderer(TEMPLATES_DIR)
    assert "https://app.example.com/appointments/9f1c" in with_url.render(
        "appointment_confirmation", "en", variables).html
    assert "<a href" not in without.render("appointment_confirmation", "en", variables).html


# -- what users read: money, layout, footer ----------------------------------------------

@pytest.mark.parametrize(("locale", "currency", "amount", "expected"), [
    ("en", "RUB", "4200", "RUB\xa04,200.00"),  # CLDR currency spacing, not "RUB4,200.00"
    ("ru", "RUB", "4200", "4\xa0200,00\xa0₽"),
    ("en", "USD", "4200.5", "$4,200.50"),
    ("ru", "EUR", "-12.5", "-12,50\xa0€"),
    ("en", "CHF", "-12.5", "-CHF\xa012.50"),
])
def test_money_reads_as_the_locale_writes_it(renderer: EmailRenderer, locale: str,
                                             currency: str, amount: str, expected: str) -> None:
    variables = {**{n: VALUES[n] for n in REQUIRED_VARIABLES["payment_failed"]},
                 "amount": amount, "currency": currency}
    mail = renderer.render("payment_failed", locale, variables)
    assert expected in mail.text
    assert expected in mail.html


FOOTER_REPLY = {"en": "Questions? Reply to this email", "ru": "Просто ответьте на это письмо"}
FOOTER_NO_REPLY = {"en": "replies to it are not read", "ru": "ответы на него не читаются"}


@pytest.mark.parametrize("reply_to", [None, "support@family.example"])
@pytest.mark.parametrize("app_url", [None, "https://app.example.com"])
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("template", sorted(REQUIRED_VARIABLES))
def test_text_parts_share_one_layout_and_the_footer_matches_reply_to(
        template: str, locale: str, app_url: str | None, reply_to: str | None) -> None:
    renderer = EmailRenderer(TEMPLATES_DIR, app_base_url=app_url, reply_to=reply_to)
    mail = renderer.render(template, locale,
                           {name: VALUES[name] for name in REQUIRED_VARIABLES[template]})
    text = mail.text
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    assert "\n\n\n" not in text  # paragraphs are separated by exactly one blank line
    body, signature, footer = text.rsplit("\n\n", 2)
    assert signature == "— Family Mind"  # the signature has a blank line before it
    assert body.splitlines()[0] in ("Hello Анна Петрова,", "Здравствуйте, Анна Петрова!")
    for part in (footer, mail.html):
        if reply_to:
            assert FOOTER_REPLY[locale] in part
            assert reply_to in part
            assert FOOTER_NO_REPLY[locale] not in part
        else:
            # Never invite a reply to the no-reply sender.
            assert FOOTER_NO_REPLY[locale] in part
            assert FOOTER_REPLY[locale] not in part
        if app_url and not reply_to:
            assert app_url in part
