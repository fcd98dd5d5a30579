"""deploy/: the Dockerfile is linted and its command lines work outside a container;
the systemd unit's commands start the reactor and it answers /healthz; .env.example
names every setting with placeholders only."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reactor.clinic.settings import Settings
from reactor.engine.pgcluster import free_port
from tests.harness import CHECKOUT, patience, wait_healthy, wait_until

HOME = CHECKOUT  # the checkout
DEPLOY = HOME / "deploy"
VENV_BIN = Path(sys.executable).parent
UNIT_VENV_BIN = "/opt/reactor/venv/bin/"  # where deploy/reactor.service expects the wheel


def run_until_healthy(argv: list[str], env: dict[str, str], port: int, cwd: Path) -> None:
    log = cwd / "reactor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=cwd)
    stop_after(proc, log, lambda: wait_healthy(port, proc, log))


def stop_after(proc: subprocess.Popen[bytes], log: Path, check: Callable[[], None]) -> None:
    """Run `check` on a started reactor, then SIGTERM it: it must exit 0. If the check
    fails, that failure is the one reported (the process is killed, not judged)."""
    try:
        check()
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=patience(30)) == 0, log.read_text()[-2000:]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(VENV_BIN / "hadolint"), str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_final_stage_holds_only_the_installed_wheel() -> None:
    """The image is the wheel installed in /opt/venv: the build stage builds and installs
    it; the final stage copies the virtualenv alone (no sources, migrations or templates
    of the checkout) and sets no REACTOR_HOME (an optional override only)."""
    text = (DEPLOY / "Dockerfile").read_text()
    build, final = re.split(r"^FROM base$", text, flags=re.M)
    assert re.search(r"pip --python /opt/venv/bin/python wheel --no-cache-dir --no-deps", build)
    assert re.search(r"--no-deps --no-index\s*\\\s*/tmp/wheels/reactor-", build)
    # Babel's locale data pruned by the languages of the installed templates.
    assert "site=$(echo /opt/venv/lib/python3*/site-packages)" in build
    assert '[ -d "$site/reactor/clinic/templates/email/${name%%_*}" ]' in build
    copies = [line for line in final.splitlines() if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /opt/venv /opt/venv"]
    assert not [line for line in final.splitlines()
                if "REACTOR_HOME" in line and not line.startswith("#")]


def test_dockerfile_command_and_healthcheck_work(database_url: str, tmp_path: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    check = json.loads(re.search(r"^\s+CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert cmd == ["reactor", "run"]
    assert "USER 10001" in text
    port = free_port()
    assert "os.environ.get('METRICS_PORT')" in check[-1]  # follows the setting, not 8766
    env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DATABASE_URL": database_url,
           "METRICS_PORT": str(port), "FEED_PORT": "0", "EMAIL_PROVIDER": "file",
           "EMAIL_OUTBOX_DIR": str(tmp_path / "outbox"), "REPORTS_DIR": str(tmp_path / "r")}
    log = tmp_path / "reactor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=tmp_path)

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        return subprocess.run(check, env=env, capture_output=True, check=False).returncode == 0
    stop_after(proc, log, lambda: wait_until(healthy, 30, "the image's HEALTHCHECK command to "
                                             "pass", every_s=0.2))


def test_systemd_unit_commands_start_and_answer_healthz(database_url: str,
                                                        tmp_path: Path) -> None:
    """The unit runs the installed wheel: no source checkout, no REACTOR_HOME (an optional
    override only); its commands, run as written, migrate and start a healthy reactor."""
    unit = (DEPLOY / "reactor.service").read_text()
    lines = [line for line in unit.splitlines() if "=" in line and not line.startswith("#")]
    directives = dict(line.split("=", 1) for line in lines)
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=always",
                      "EnvironmentFile=/etc/reactor/reactor.env"):
        key, value = hardening.split("=", 1)
        assert directives[key] == value
    assert not [line for line in lines if "REACTOR_HOME" in line or "/src" in line], lines
    assert directives["WorkingDirectory"] == "/var/lib/reactor"  # the state directory
    assert directives["ExecStart"] == f"{UNIT_VENV_BIN}reactor run"
    assert directives["ExecStartPre"] == f"{UNIT_VENV_BIN}reactor migrate"
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
        env[key] = value

    def argv(directive: str) -> list[str]:
        return [part.replace(UNIT_VENV_BIN, f"{VENV_BIN}/")
                for part in shlex.split(directives[directive])]

    pre = subprocess.run(argv("ExecStartPre"), env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert pre.returncode == 0, pre.stderr
    run_until_healthy(argv("ExecStart"), env, port, tmp_path)


def test_env_example_names_every_setting_with_placeholders_only() -> None:
    text = (HOME / ".env.example").read_text()
    # Comment lines may be indented (a comment continued under the previous value).
    lines = [line.strip() for line in text.splitlines()]
    assignments = [line for line in lines if line and not line.startswith("#")]
    names = {line.split("=", 1)[0] for line in assignments}
    aliases = {str(field.alias) for field in Settings.model_fields.values()}
    assert aliases <= names, sorted(aliases - names)
    values = {line.split("=", 1)[0]: line.split("=", 1)[1].split("#")[0].strip()
              for line in assignments}
    for secret in ("SMTP_PASS", "YOOKASSA_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY",
                   "FEED_TOKEN"):
        assert values[secret] in ("", "CHANGE_ME"), secret
    assert "CHANGE_ME@" in values["DATABASE_URL"]


@pytest.mark.parametrize("name", [".env", ".reactor/"])
def test_local_state_is_never_committed(name: str) -> None:
    assert name in (HOME / ".gitignore").read_text().splitlines()


# -- docker-compose.yml -------------------------------------------------------------------
def compose_config(tmp_path: Path, env_file: str) -> dict[str, Any]:
    """deploy/docker-compose.yml as `docker-compose config` resolves and validates it
    (the compose schema, interpolation, env_file), in a copy of the repository layout."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is not installed: scripts/install-system-deps "
                    "(apt-get install -y docker-compose)")
    (tmp_path / "deploy").mkdir()
    shutil.copy(DEPLOY / "docker-compose.yml", tmp_path / "deploy" / "docker-compose.yml")
    (tmp_path / ".env").write_text(env_file)
    env = {"PATH": os.environ["PATH"], "POSTGRES_PASSWORD": "pw-for-the-test"}
    result = subprocess.run([tool, "-f", "deploy/docker-compose.yml", "--profile", "tools",
                             "config"], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # docker-compose prints YAML; its own interpreter has PyYAML (the project's venv has not).
    python = Path(tool).read_text().splitlines()[0].removeprefix("#!").split()
    as_json = subprocess.run([*python, "-c", "import json, sys, yaml; "
                              "json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                             input=result.stdout, capture_output=True, text=True, timeout=60,
                             check=True)
    config: dict[str, Any] = json.loads(as_json.stdout)
    return config


def env_example_as_compose_reads_it() -> str:
    """.env.example with its inline comments removed (as `docker compose` v2 reads an env
    file; v1 would keep them in the values)."""
    from dotenv import dotenv_values

    values = dotenv_values(HOME / ".env.example")
    return "".join(f"{key}={value or ''}\n" for key, value in values.items())


def test_compose_file_is_valid_and_matches_the_image(tmp_path: Path) -> None:
    config = compose_config(tmp_path, env_example_as_compose_reads_it())
    services = config["services"]
    assert set(services) == {"db", "migrate", "reactor", "prometheus"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    image_cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    exposed = set(re.search(r"^EXPOSE (.*)$", dockerfile, re.M).group(1).split())  # type: ignore[union-attr]
    image_volume = json.loads(re.search(r"^VOLUME (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]

    for name in ("migrate", "reactor"):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(service["build"]["context"]) == tmp_path  # the repository root
        url = service["environment"]["DATABASE_URL"]
        assert url == "postgresql://postgres:pw-for-the-test@db:5432/postgres"  # direct, not 6543
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["reactor", "migrate"]
    assert services["migrate"]["profiles"] == ["tools"]  # a one-off, not started by `up`

    reactor = services["reactor"]
    env = reactor["environment"]
    assert reactor.get("command", image_cmd) == image_cmd == ["reactor", "run"]
    assert "healthcheck" not in reactor  # the image's own HEALTHCHECK (/healthz on METRICS_PORT)
    published = {port["target"] if isinstance(port, dict) else port.rsplit(":", 1)[1]
                 for port in reactor["ports"]}
    assert {str(p).split("/")[0] for p in published} == {env["FEED_PORT"], env["METRICS_PORT"]}
    assert {env["FEED_PORT"], env["METRICS_PORT"]} == {p.split("/")[0] for p in exposed}
    for port in reactor["ports"]:
        assert str(port).startswith("127.0.0.1:") or port.get("host_ip") == "127.0.0.1"
    [volume] = reactor["volumes"]
    mount = volume["target"] if isinstance(volume, dict) else volume.split(":")[1]
    assert [mount] == image_volume == ["/var/lib/reactor"]
    for setting in ("REPORTS_DIR", "EMAIL_OUTBOX_DIR"):  # on the volume, writable by uid 10001
        assert env[setting].startswith("/var/lib/reactor/"), (setting, env[setting])
    grace = float(reactor["stop_grace_period"].removesuffix("s"))
    assert grace > float(env.get("SHUTDOWN_GRACE_S", "10"))
    assert env["FEED_HOST"] == "0.0.0.0"  # reachable through the published port
    assert "test" in services["db"]["healthcheck"]
    readme = (HOME / "README.md").read_text()
    for command in ("docker compose -f deploy/docker-compose.yml run --rm migrate",
                    "docker compose -f deploy/docker-compose.yml up -d",
                    "docker build -f deploy/Dockerfile"):
        assert command in readme, command


def test_compose_prometheus_profile_scrapes_the_reactor_with_the_alert_rules(
        tmp_path: Path) -> None:
    """docs/operations.md §8, "Alerts": off by default, Prometheus in the reactor's network
    namespace (a direct loopback scrape: no token, no Host to allow) with the rules loaded;
    its config is valid for Prometheus and scrapes the compose file's METRICS_PORT."""
    config = compose_config(tmp_path, env_example_as_compose_reads_it())
    prometheus = config["services"]["prometheus"]
    assert prometheus["profiles"] == ["prometheus"]  # not started by a plain `up`
    assert prometheus["network_mode"] == "service:reactor"
    assert "ports" not in prometheus
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]
              if isinstance(v, str)}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(
        tmp_path / "deploy" / "prometheus" / "prometheus.yml")
    assert mounts["/etc/prometheus/alerts.yml"] == str(
        tmp_path / "deploy" / "prometheus" / "alerts.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    port = config["services"]["reactor"]["environment"]["METRICS_PORT"]
    assert f'targets: ["127.0.0.1:{port}"]' in scrape
    assert "job_name: reactor" in scrape
    assert "- alerts.yml" in scrape
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/install-system-deps)")
    check = subprocess.run([promtool, "check", "config", "prometheus.yml"],
                           cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "8 rules found" in check.stdout
    readme = (HOME / "docs" / "operations.md").read_text()
    assert "--profile prometheus up -d" in readme


def test_compose_file_names_the_missing_password() -> None:
    tool = shutil.which("docker-compose")
    assert tool is not None, "docker-compose is not installed: scripts/install-system-deps"
    env = {"PATH": os.environ["PATH"]}
    result = subprocess.run([tool, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr


# -- requirements.lock -------------------------------------------------------------------
def test_requirements_lock_pins_every_dependency_with_hashes() -> None:
    """The image installs deploy/requirements.lock only: a dependency added to pyproject
    without re-locking would be missing from the image."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (DEPLOY / "requirements.lock").read_text()
    pins: dict[str, str] = {}
    for entry in re.findall(r"^([A-Za-z0-9][^\s;\\]*==[^\s;\\]+)[^\n]*\\\n((?:\s+--hash=.*\n)+)",
                            lock, re.M):
        name, version = entry[0].split("==")
        assert "sha256:" in entry[1], name
        pins[canonicalize_name(name)] = version
    pyproject = tomllib.loads((HOME / "pyproject.toml").read_text())
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, (
            f"{name} is not in deploy/requirements.lock: run scripts/lock-requirements")
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {requirement}: run scripts/lock-requirements")
    assert "--require-hashes" in (DEPLOY / "Dockerfile").read_text()
