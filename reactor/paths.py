"""Where the project's non-Python files live (migrations, templates).

They sit beside the package in the source tree and in the container image;
REACTOR_HOME points elsewhere when the package is installed on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME = Path(os.environ.get("REACTOR_HOME") or Path(__file__).resolve().parent.parent)
MIGRATIONS_DIR = HOME / "migrations"
TEMPLATES_DIR = HOME / "templates"
