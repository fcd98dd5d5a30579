"""Where the clinic's non-Python files are: its migrations and its templates.

The source tree keeps them in the top-level `migrations/` and `templates/`
folders; the wheel carries the same files as the packages
`reactor.clinic.migrations` and `reactor.clinic.templates` (pyproject.toml maps
the folders there), so an installed reactor needs no source checkout.
REACTOR_HOME, when set, overrides both: `$REACTOR_HOME/migrations`,
`$REACTOR_HOME/templates` (a customised copy).
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

__all__ = ["MIGRATIONS_DIR", "TEMPLATES_DIR", "resource_dir"]

_SOURCE_TREE = Path(__file__).resolve().parents[2]


def resource_dir(name: str) -> Path:
    """The folder `name` (migrations, templates): REACTOR_HOME's, the installed
    package's, else the source tree's."""
    if home := os.environ.get("REACTOR_HOME"):
        return Path(home) / name
    # A folder without __init__.py is a namespace package: its spec lists where it is
    # (importlib.resources.files would give a MultiplexedPath, not a folder).
    try:
        spec = find_spec(f"reactor.clinic.{name}")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        packaged = Path(location)
        if packaged.is_dir() and any(packaged.iterdir()):
            return packaged
    return _SOURCE_TREE / name


MIGRATIONS_DIR = resource_dir("migrations")
TEMPLATES_DIR = resource_dir("templates")
