"""The container tier (`make test-container`, marker `container`; `make test` leaves it out).

Builds deploy/Dockerfile with podman on a locally bootstrapped stand-in for
python:3.11-slim (scripts/build-base-image; no registry is reachable here),
then checks the image from the outside against the project's throwaway
Postgres 15 + pg_cron: `reactor migrate` as a one-off container, `reactor run`
healthy by the image's own HEALTHCHECK, as a non-root uid, processing what the
host commits (an analytics row; a mail in the file outbox on a volume),
stopping with exit 0 on SIGTERM, and two replicas sharing the work with no
message handled twice.

podman runs with the project's private configuration (scripts/podman-private:
runc, ulimits within the host's limits, storage in a cache directory, so the
base image and the build layers are reused by the next run). Containers use
slirp4netns with allow_host_loopback: they keep their own loopback (the
image's ports and HEALTHCHECK unchanged) and reach the host's 127.0.0.1,
where the test cluster listens, as 10.0.2.2.

The module's tests share one image, one migrated database and one running
container, in the order written (the SIGTERM test stops that container).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reactor.engine.pgcluster import PgCluster
from tests.harness import CHECKOUT

HOME = CHECKOUT  # the checkout

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

PODMAN = HOME / "scripts" / "podman-private"
NETWORK = "slirp4netns:allow_host_loopback=true"
HOST_FROM_CONTAINER = "10.0.2.2"
IMAGE = "localhost/reactor:test"
BUILD_STAGE = "localhost/reactor-build:test"
LABEL = "reactor-test-tier=1"  # on every container and volume the tier makes
USER_ID = 10001
BUILD_BUDGET_S = 1200
START_BUDGET_S = 120
WORK_BUDGET_S = 120
STOP_GRACE_S = 30
ARTIFACTS = HOME / "test-artifacts" / "container"


def podman(*args: str, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """One podman command with the private configuration; raises with its output on failure."""
    result = subprocess.run([str(PODMAN), *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} … exited {result.returncode}:\n"
                             f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def wait_for(what: str, probe: Callable[[], bool], budget_s: float,
             diagnose: Callable[[], str] = lambda: "") -> None:
    """Poll `probe` every 0.5 s until it is true; fail naming `what` after `budget_s`."""
    deadline = time.monotonic() + budget_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {budget_s:.0f} s\n{diagnose()}")
        time.sleep(0.5)


def podman_unavailable() -> str | None:
    """Why this machine cannot run the tier, or None."""
    missing = [tool for tool in ("podman", "runc", "mmdebstrap", "slirp4netns")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(as root: WITH_CONTAINER=1 scripts/install-system-deps)")
    if os.geteuid() != 0:
        return "the container tier runs rootful podman: run make test-container as root"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "podman info did not answer within 60 s"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"podman cannot run here (podman info: {last})"
    return None


def remove_leftovers() -> None:
    """Containers and volumes of an earlier run that was killed before its cleanup
    (one run at a time per cache directory)."""
    stale = podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}").stdout.split()
    if stale:
        podman("rm", "--force", "--volumes", "--time", "0", *stale)
    podman("volume", "prune", "--force")  # the private store: only this tier's volumes


@pytest.fixture(scope="module")
def image() -> str:
    """deploy/Dockerfile built on the cached stand-in base; the build stage is tagged too,
    so pruning dangling images keeps its layers for the next run."""
    reason = podman_unavailable()
    if reason:
        pytest.skip(f"container tier skipped: {reason}")
    remove_leftovers()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's logs only
    ARTIFACTS.mkdir(parents=True)
    started = time.monotonic()
    base = subprocess.run([str(HOME / "scripts" / "build-base-image")], capture_output=True,
                          text=True, timeout=BUILD_BUDGET_S, check=False)
    assert base.returncode == 0, f"scripts/build-base-image failed:\n{base.stderr[-4000:]}"
    base_ref = base.stdout.strip().splitlines()[-1]
    log = []
    for target in (["--target", "build", "-t", BUILD_STAGE], ["-t", IMAGE]):
        built = podman("build", "--format", "docker", "--from", base_ref, *target,
                       "-f", str(HOME / "deploy" / "Dockerfile"), str(HOME),
                       timeout=BUILD_BUDGET_S)
        log.append(built.stdout + built.stderr)
    (ARTIFACTS / "build.log").write_text("\n".join(log))
    podman("image", "prune", "--force")
    size = podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    base_size = podman("image", "inspect", "--format", "{{.Size}}", base_ref).stdout.strip()
    (ARTIFACTS / "image.txt").write_text(
        f"base {base_ref} {int(base_size) / 1e6:.0f} MB\nimage {IMAGE} {int(size) / 1e6:.0f} MB\n"
        f"base + build: {time.monotonic() - started:.0f} s\n")
    return IMAGE


@dataclass
class Database:
    """An empty database of the test cluster, as the host and as a container see it."""

    host_url: str
    container_url: str

    def query(self, statement: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.host_url, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()


@pytest.fixture(scope="module")
def database(pg_cluster: PgCluster) -> Iterator[Database]:
    name = f"c_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name)
    try:
        yield Database(url, f"postgresql://postgres@{HOST_FROM_CONTAINER}:{pg_cluster.port}/{name}")
    finally:
        pg_cluster.drop_database(name)


@dataclass
class Containers:
    """Containers and volumes made by this module, removed at the end whatever happens."""

    image: str
    database: Database
    names: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def volume(self) -> tuple[str, Path]:
        """A new named volume and where it lives on the host (rootful podman)."""
        name = f"reactor-test-{uuid.uuid4().hex[:8]}"
        podman("volume", "create", "--label", LABEL, name)
        self.volumes.append(name)
        mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout
        return name, Path(mountpoint.strip())

    def run(self, volume: str, *env: str) -> str:
        """`reactor run` (the image's CMD), detached, with the file outbox on `volume`."""
        name = f"reactor-test-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        podman("run", "--detach", "--name", name, "--label", LABEL, "--network", NETWORK,
               "--volume", f"{volume}:/var/lib/reactor",
               "--env", f"DATABASE_URL={self.database.container_url}",
               "--env", "EMAIL_PROVIDER=file", "--env", "SMTP_FROM=care@family.example",
               "--env", "LOG_LEVEL=info", *(arg for item in env for arg in ("--env", item)),
               self.image)
        return name

    def logs(self, name: str) -> str:
        result = podman("logs", name, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def inspect(self, name: str, template: str) -> str:
        return podman("inspect", "--format", template, name).stdout.strip()

    def healthy(self, name: str) -> bool:
        """The image's own HEALTHCHECK, run now (no systemd timer here)."""
        if self.inspect(name, "{{.State.Running}}") != "true":
            raise AssertionError(f"{name} is not running:\n{self.logs(name)}")
        return podman("healthcheck", "run", name, check=False).returncode == 0

    def wait_healthy(self, name: str) -> None:
        wait_for(f"{name} healthy by its HEALTHCHECK", lambda: self.healthy(name),
                 START_BUDGET_S, lambda: self.logs(name))

    def metric(self, name: str, metric: str, **labels: str) -> float:
        """A value from the container's own /metrics (read inside: its port is not published)."""
        text = podman("exec", name, "python", "-c",
                      "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:8766/metrics', timeout=10).read().decode())").stdout
        wanted = {f'{key}="{value}"' for key, value in labels.items()}
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(metric + "{")
                  and wanted <= set(line[len(metric) + 1:line.index("}")].split(","))]
        return sum(values)

    def stop(self, name: str) -> int:
        """SIGTERM (`podman stop`), SIGKILL only after the grace; the exit code."""
        podman("stop", "--time", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 60)
        return int(self.inspect(name, "{{.State.ExitCode}}"))

    def remove_all(self) -> None:
        for name in self.names:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"{name}.log").write_text(self.logs(name))
            podman("rm", "--force", "--volumes", "--time", "0", name, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)
        podman("volume", "prune", "--force", check=False)  # anonymous ones of `run --rm`


@pytest.fixture(scope="module")
def containers(image: str, database: Database) -> Iterator[Containers]:
    made = Containers(image, database)
    try:
        yield made
    finally:
        made.remove_all()


@dataclass
class Running:
    name: str
    outbox: Path


@pytest.fixture(scope="module")
def running(containers: Containers) -> Running:
    """One `reactor run` container on the migrated database, healthy."""
    migrated = podman("run", "--rm", "--network", NETWORK,
                      "--env", f"DATABASE_URL={containers.database.container_url}",
                      containers.image, "reactor", "migrate", timeout=300)
    assert migrated.returncode == 0
    volume, mountpoint = containers.volume()
    name = containers.run(volume)
    containers.wait_healthy(name)
    return Running(name, mountpoint / "outbox")


# -- the image ---------------------------------------------------------------------------
def test_image_is_lean_runs_reactor_run_as_non_root_and_keeps_its_healthcheck(
        image: str) -> None:
    [inspected] = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == f"{USER_ID}:{USER_ID}"
    assert config["Cmd"] == ["reactor", "run"]
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])  # kept: --format docker
    assert not [var for var in config["Env"] if var.startswith("REACTOR_HOME=")]  # optional
    assert config["WorkingDir"] == "/var/lib/reactor"
    found = json.loads(podman("run", "--rm", "--network", "none", image, "python", "-c",
                              INSIDE_THE_IMAGE).stdout)
    assert found["uid"] == USER_ID
    assert found["leftovers"] == []  # no sources, tests, .git: only the virtualenv
    packages = {entry.split("-")[0].lower() for entry in found["site_packages"]}
    for needless in ("pip", "setuptools", "wheel", "pytest", "mypy", "ruff", "playwright"):
        assert needless not in packages, needless
    # reactor finds its migrations and templates in its installed package (no REACTOR_HOME),
    # and the package carries every migration of the checkout.
    assert found["migrations_dir"] == f"{found['package']}/clinic/migrations"
    assert found["templates_dir"] == f"{found['package']}/clinic/templates"
    for folder, in_package in (("migrations", "clinic_migrations"),
                               ("reactor/engine/migrations", "engine_migrations")):
        in_checkout = sorted(path.name for path in (HOME / folder).glob("*.sql"))
        assert found[in_package] == in_checkout, folder
    assert found["dashboard"]
    # Babel's locale data pruned to the languages of the installed templates.
    languages = sorted(path.name for path in (HOME / "templates" / "email").iterdir()
                       if path.is_dir())
    assert found["languages"] == languages
    kept = {name.removesuffix(".dat").split("_")[0] for name in found["locales"]
            if name.endswith(".dat")}
    assert kept == {"root", *languages}, kept


# Run inside the image (as its user, from its WORKDIR): where reactor finds its files.
INSIDE_THE_IMAGE = """
import json, os, sysconfig
from pathlib import Path
import reactor
from reactor.clinic import resources
site = Path(sysconfig.get_paths()["purelib"])
package = Path(reactor.__file__).parent
def sql(folder):
    return sorted(p.name for p in folder.glob("*.sql")) if folder.is_dir() else []
print(json.dumps({
    "uid": os.getuid(),
    "leftovers": [p for p in ("/app", "/src", "/opt/venv/src") if os.path.exists(p)],
    "site_packages": sorted(os.listdir(site)),
    "package": str(package),
    "migrations_dir": str(resources.MIGRATIONS_DIR),
    "templates_dir": str(resources.TEMPLATES_DIR),
    "clinic_migrations": sql(resources.MIGRATIONS_DIR),
    "engine_migrations": sql(package / "engine" / "migrations"),
    "dashboard": (package / "engine" / "dashboard" / "index.html").is_file(),
    "languages": sorted(p.name for p in (resources.TEMPLATES_DIR / "email").glob("*/")),
    "locales": sorted(os.listdir(site / "babel" / "locale-data")),
}))
"""


def test_migrate_runs_as_a_one_off_container(containers: Containers) -> None:
    for _ in range(2):  # and again: already applied is not an error
        result = podman("run", "--rm", "--network", NETWORK,
                        "--env", f"DATABASE_URL={containers.database.container_url}",
                        containers.image, "reactor", "migrate", timeout=300)
        assert result.returncode == 0, result.stderr
    applied = {str(row[0]) for row in containers.database.query(
        "SELECT version FROM supabase_migrations.schema_migrations")}
    in_tree = {re.match(r"(\d+)_", path.name).group(1)  # type: ignore[union-attr]
               for path in (HOME / "migrations").glob("[0-9]*_*.sql")}
    assert in_tree <= applied, sorted(in_tree - applied)


# -- one reactor ------------------------------------------------------------------------
def test_reactor_run_is_healthy_by_the_image_healthcheck_as_a_non_root_uid(
        containers: Containers, running: Running) -> None:
    assert containers.healthy(running.name)
    assert containers.inspect(running.name, "{{.State.Health.Status}}") == "healthy"
    status = podman("exec", running.name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
    assert uids == [str(USER_ID)] * 4  # real, effective, saved, filesystem
    cmdline = podman("exec", running.name, "cat", "/proc/1/cmdline").stdout
    *_, program, command = cmdline.rstrip("\0").split("\0")  # python? /opt/venv/bin/reactor run
    assert (Path(program).name, command) == ("reactor", "run")


def test_a_message_committed_on_the_host_is_processed_by_the_container(
        containers: Containers, running: Running) -> None:
    db = containers.database
    event = f"container.check_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(db.host_url) as conn, conn.transaction():
        analytics_id = conn.execute("SELECT public.queue_analytics_event(%s, NULL, %s::jsonb)",
                                    (event, '{"from": "host"}')).fetchone()[0]  # type: ignore[index]
        conn.execute("SELECT public.queue_email_task(%s, NULL, 'checkup_completed', %s::jsonb,"
                     " 0, 'en')", ("parent@family.example",
                                   json.dumps({"full_name": "Anna Host",
                                               "assessment_id": str(uuid.uuid4())})))

    def stored() -> bool:
        return bool(db.query("SELECT 1 FROM public.analytics_events"
                             " WHERE source_msg_id = %s AND event = %s", analytics_id, event))

    wait_for("the analytics row", stored, WORK_BUDGET_S, lambda: containers.logs(running.name))
    wait_for("a mail in the outbox volume", lambda: any(running.outbox.glob("*.eml")),
             WORK_BUDGET_S, lambda: containers.logs(running.name))
    [path] = list(running.outbox.glob("*.eml"))
    assert path.stat().st_uid == USER_ID
    mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert mail["To"] == "parent@family.example"
    assert mail.get_body(("plain",)) is not None
    assert "Anna Host" in mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "parent@family.example" not in containers.logs(running.name)  # masked in logs


def test_sigterm_stops_the_container_with_exit_0_within_the_grace(
        containers: Containers, running: Running) -> None:
    started = time.monotonic()
    code = containers.stop(running.name)
    assert code == 0, containers.logs(running.name)  # 137 would mean SIGKILL after the grace
    assert time.monotonic() - started < STOP_GRACE_S + 30
    assert containers.inspect(running.name, "{{.State.Status}}") == "exited"
    assert "reactor.stopping" in containers.logs(running.name)


# -- replicas -------------------------------------------------------------------------
def test_two_replicas_share_the_work_and_handle_each_message_once(
        containers: Containers, running: Running) -> None:
    db = containers.database
    volume, mountpoint = containers.volume()
    outbox = mountpoint / "outbox"
    # Small read batches, so that both replicas get a share of one burst.
    replicas = [containers.run(volume, "MAX_TASKS_PER_CYCLE=5") for _ in range(2)]
    for name in replicas:
        containers.wait_healthy(name)
    events, mails = 400, 20
    before = db.query("SELECT count(*) FROM public.analytics_events")[0][0]
    last = {queue: db.query(f"SELECT coalesce(max(msg_id), 0) FROM pgmq.a_{queue}")[0][0]
            for queue in ("analytics_queue", "email_queue")}
    with psycopg.connect(db.host_url) as conn:
        for batch in range(4):
            with conn.transaction():
                conn.execute("SELECT public.queue_analytics_event('replica.check', NULL,"
                             " jsonb_build_object('n', n)) FROM generate_series(1, %s) n",
                             (events // 4,))
                if batch == 0:
                    conn.execute("SELECT public.queue_email_task('r' || n || '@family.example',"
                                 " NULL, 'checkup_completed', jsonb_build_object('full_name',"
                                 " 'R' || n, 'assessment_id', gen_random_uuid()), 0, 'en')"
                                 " FROM generate_series(1, %s) n", (mails,))

    def done() -> bool:
        rows = db.query("SELECT count(*) FROM public.analytics_events")[0][0]
        return bool(rows == before + events and len(list(outbox.glob("*.eml"))) >= mails)

    wait_for(f"{events} analytics rows and {mails} mails", done, WORK_BUDGET_S,
             lambda: "\n".join(containers.logs(name)[-2000:] for name in replicas))
    # Every message was read once (read_ct 1) and archived once: nobody handled it twice.
    for queue in ("analytics_queue", "email_queue"):
        reads = db.query(f"SELECT read_ct, count(*) FROM pgmq.a_{queue}"
                         " WHERE msg_id > %s GROUP BY read_ct", last[queue])
        assert dict(reads) == {1: events if queue == "analytics_queue" else mails}, reads
    assert len(list(outbox.glob("*.eml"))) == mails
    handled = [containers.metric(name, "reactor_jobs_total", queue="analytics_queue",
                                 outcome="succeeded") for name in replicas]
    (ARTIFACTS / "replicas.txt").write_text(f"analytics jobs per replica: {handled}\n")
    assert sum(handled) == events, handled
    assert all(count > 0 for count in handled), handled  # shared, not one doing it all
    for name in replicas:
        assert containers.stop(name) == 0, containers.logs(name)
