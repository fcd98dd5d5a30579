"""deploy/: the Dockerfile is linted and its command lines work outside a container;
the systemd unit's commands start the reactor and it answers /healthz; .env.example
names every setting with placeholders only."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reactor.config import Settings
from reactor.paths import HOME
from reactor.pgcluster import free_port
from tests.harness import wait_healthy

DEPLOY = HOME / "deploy"
VENV_BIN = Path(sys.executable).parent


def run_until_healthy(argv: list[str], env: dict[str, str], port: int, cwd: Path) -> None:
    log = cwd / "reactor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=cwd)
    try:
        wait_healthy(port, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(VENV_BIN / "hadolint"), str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_command_and_healthcheck_work(database_url: str, tmp_path: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    check = json.loads(re.search(r"^\s+CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert cmd == ["reactor", "run"]
    assert "USER 10001" in text
    port = free_port()
    check = [part.replace(":8766/", f":{port}/") for part in check]
    env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DATABASE_URL": database_url,
           "METRICS_PORT": str(port), "FEED_PORT": "0", "EMAIL_PROVIDER": "file",
           "EMAIL_OUTBOX_DIR": str(tmp_path / "outbox"), "REPORTS_DIR": str(tmp_path / "r")}
    log = tmp_path / "reactor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(check, env=env, capture_output=True, check=False).returncode != 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_systemd_unit_commands_start_and_answer_healthz(database_url: str,
                                                        tmp_path: Path) -> None:
    unit = (DEPLOY / "reactor.service").read_text()
    directives = dict(line.split("=", 1) for line in unit.splitlines()
                      if "=" in line and not line.startswith("#"))
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=always",
                      "EnvironmentFile=/etc/reactor/reactor.env"):
        key, value = hardening.split("=", 1)
        assert directives[key] == value
    port = free_port()
    env_file = tmp_path / "reactor.env"
    env_file.write_text(f"DATABASE_URL={database_url}\nMETRICS_PORT={port}\nFEED_PORT=0\n"
                        f"EMAIL_PROVIDER=file\nEMAIL_OUTBOX_DIR={tmp_path / 'outbox'}\n"
                        f"REPORTS_DIR={tmp_path / 'reports'}\n")
    env = {"PATH": os.environ["PATH"]}
    for line in env_file.read_text().splitlines():
        key, value = line.split("=", 1)
        env[key] = value
    for assignment in shlex.split(directives["Environment"]):
        key, value = assignment.split("=", 1)
        env[key] = value if key != "REACTOR_HOME" else str(HOME)

    def argv(directive: str) -> list[str]:
        return [part.replace("/opt/reactor/.venv/bin/", f"{VENV_BIN}/")
                for part in shlex.split(directives[directive])]

    pre = subprocess.run(argv("ExecStartPre"), env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert pre.returncode == 0, pre.stderr
    run_until_healthy(argv("ExecStart"), env, port, tmp_path)


def test_env_example_names_every_setting_with_placeholders_only() -> None:
    text = (HOME / ".env.example").read_text()
    names = {line.split("=", 1)[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    aliases = {str(field.alias) for field in Settings.model_fields.values()}
    assert aliases <= names, sorted(aliases - names)
    values = {line.split("=", 1)[0]: line.split("=", 1)[1].split("#")[0].strip()
              for line in text.splitlines() if line and not line.startswith("#")}
    for secret in ("SMTP_PASS", "YOOKASSA_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY",
                   "FEED_TOKEN"):
        assert values[secret] in ("", "CHANGE_ME"), secret
    assert "CHANGE_ME@" in values["DATABASE_URL"]


@pytest.mark.parametrize("name", [".env", ".reactor/"])
def test_local_state_is_never_committed(name: str) -> None:
    assert name in (HOME / ".gitignore").read_text().splitlines()
