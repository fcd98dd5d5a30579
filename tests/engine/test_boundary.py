"""The engine is a library of its own: it loads none of the clinic, and an app on it
is loaded by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reactor.engine.app import load_app
from reactor.engine.settings import ConfigError

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
