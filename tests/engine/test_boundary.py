"""The engine is a library of its own: it loads none of the clinic, and an app on it
is loaded by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reactor.engine.app import App, Queue, load_app
from reactor.engine.settings import ConfigError, EngineSettings

CLINIC_LIBRARIES = ("fpdf", "fontTools", "aiosmtplib", "httpx", "jinja2", "babel")


def test_importing_the_engine_loads_none_of_the_clinics_libraries() -> None:
    """In a fresh interpreter: every engine module imported, none of the PDF, mail,
    HTTP-client or template libraries (nor the clinic itself) is in sys.modules."""
    code = (
        "import pkgutil, importlib, sys, reactor.engine\n"
        "for m in pkgutil.walk_packages(reactor.engine.__path__, 'reactor.engine.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {CLINIC_LIBRARIES!r}\n"
        "             or n.startswith('reactor.clinic'))\n"
        "print(len([n for n in sys.modules if n.startswith('reactor.engine')]), bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split(" ", 1)
    assert int(out[0]) > 20  # the whole engine was imported
    assert out[1].strip() == "[]"


@pytest.mark.parametrize(("path", "message"), [
    ("nocolon", "write it as module:factory"),
    ("no.such.module:build", "cannot load it"),
    ("reactor.engine.settings:ConfigError", "not reactor.engine.App"),
    ("reactor.engine.app:__doc__", "is not a factory"),
    ("reactor.engine.app:App", "the factory failed: TypeError"),
])
def test_an_app_path_that_names_no_app_is_one_clear_line(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_app(path)


def test_the_commands_that_do_not_drain_load_no_processor_library() -> None:
    """`reactor status`, `dlq`, `migrate` build the clinic app for its queue names: its
    processors are named by path and imported only by `reactor run`, so these commands
    start in about a second instead of three (aiosmtplib, jinja2 …). fpdf2 and fontTools
    wait for the first report even there (0.6 s of every start, and most replicas and
    test runs render none); httpx waits for the YooKassa provider or the first upload
    to Storage (the defaults, PAYMENT_PROVIDER=manual and local reports, need none)."""
    code = (
        "import sys\n"
        "from reactor.clinic.app import build\n"
        "from reactor.clinic.settings import Settings\n"
        "app = build(Settings(database_url='postgresql://u@h/db'))\n"
        f"before = sorted({{n.split('.')[0] for n in sys.modules}} & set({CLINIC_LIBRARIES!r}))\n"
        "app.processors\n"
        f"after = sorted({{n.split('.')[0] for n in sys.modules}} & set({CLINIC_LIBRARIES!r}))\n"
        "print(len(app.queue_names), before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "4 [] ['aiosmtplib', 'babel', 'jinja2']"


@pytest.mark.parametrize(("processor", "message"), [
    ("no_colon", "write its processor as module:Class"),
    ("no.such.module:Thing", "cannot load its processor"),
    ("reactor.engine.settings:ConfigError", "is not a Processor class"),
])
def test_a_processor_path_that_names_no_processor_is_one_clear_line(
        processor: str, message: str) -> None:
    settings = EngineSettings(database_url="postgresql://u@h/db")
    with pytest.raises(ConfigError, match=message):
        _ = App(name="x", settings=settings, migrations=Path("."),
                queues=(Queue("x_queue", processor),)).processors


def test_the_pytest_plugin_costs_nothing_until_its_fixtures_are_used() -> None:
    """pytest loads reactor.testing in every run where the wheel is installed, most of
    them about something else: loading it imports none of the engine (psycopg, trio,
    pydantic …)."""
    code = ("import sys, reactor.testing\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in "
            "('psycopg', 'trio', 'pydantic', 'structlog') or n.startswith('reactor.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
