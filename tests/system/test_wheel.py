"""The wheel is the product (issue 25): built from the checkout, installed into a
clean virtualenv, it migrates a fresh database, runs, writes a checkup's PDF report
and its mails, and serves the dashboard, with no source tree and no REACTOR_HOME.

The wheel is built from a copy of the files the checkout tracks (or would track:
untracked, not ignored), not from the checkout itself: setuptools builds through
`build/lib`, which it never cleans, so a wheel built in place also carries modules
that were deleted or moved since the last build. The copy holds what the image's
build context holds (.dockerignore): pyproject.toml, README.md, reactor/,
migrations/, templates/.

The virtualenv has no pip and no dependencies of its own: a `.pth` line puts this
interpreter's site-packages after its own (a plain path: the `.pth` files there,
such as the editable install's finder, are not run), and only the wheel is installed
into it. Every command runs from an empty folder with only PATH and the settings in
its environment, so the checkout cannot be imported by accident; the test checks
where `reactor`, its migrations, templates and dashboard were found.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests import factories as f
from tests.harness import CHECKOUT, log_lines, ports, wait_until

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

HOME = CHECKOUT  # the checkout
# The checkout's folders and where the wheel carries them (pyproject.toml: package-dir).
MAPPED = {"reactor/": "reactor/", "migrations/": "reactor/clinic/migrations/",
          "templates/": "reactor/clinic/templates/"}
BUILD_INPUTS = ("pyproject.toml", "README.md", "reactor", "migrations", "templates")

RESULTS = {
    "child_name": "Маша Петрова",
    "scores": [{"domain": "Внимание и концентрация", "score": 18, "max": 20, "band": "high"}],
    "summary": "Ребёнок в целом справляется.",
    "recommendations": ["Ежедневные прогулки."],
}


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
        timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout_s, check=False)
    assert result.returncode == 0, (f"{' '.join(argv[:4])} … exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def checkout_files() -> list[str]:
    """The build's inputs as the checkout has them: tracked or untracked-not-ignored,
    present in the working tree."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                  "--", *BUILD_INPUTS], cwd=HOME).stdout.split("\0")
    return sorted(name for name in set(listed) if name and (HOME / name).is_file())


def in_wheel(name: str) -> str | None:
    """Where a checkout file goes in the wheel (None: not in it)."""
    for folder, target in MAPPED.items():
        if name.startswith(folder):
            return target + name.removeprefix(folder)
    return None


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    bin: Path
    work: Path  # an empty folder to run from


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of a clean copy of the checkout's build inputs."""
    source = tmp_path_factory.mktemp("wheel-source")
    for name in checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HOME / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out),
         str(source)], cwd=source, timeout_s=240)
    [built] = out.glob("reactor-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A new virtualenv with the wheel installed, the dependencies borrowed (see above)."""
    venv = tmp_path_factory.mktemp("venv")
    work = tmp_path_factory.mktemp("empty")
    run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=work, env={}).stdout.strip()
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "borrowed-dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)], cwd=work)
    return Installed(venv, wheel, venv / "bin", work)


def clean_env(**settings: str) -> dict[str, str]:
    """Only PATH and the settings: no PYTHONPATH, no REACTOR_HOME, no VIRTUAL_ENV."""
    return {"PATH": os.environ["PATH"], **settings}


def test_the_wheel_carries_exactly_the_checkouts_modules_migrations_templates_and_page(
        wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = {n for n in whl.namelist() if not n.startswith("reactor-0")}  # not dist-info
        entry_points = next(whl.read(n).decode() for n in whl.namelist()
                            if n.endswith(".dist-info/entry_points.txt"))
    expected = {target for name in checkout_files() if (target := in_wheel(name))}
    assert "reactor/engine/dashboard/index.html" in expected
    assert any(n.startswith("reactor/clinic/migrations/0") for n in expected)
    assert any(n.startswith("reactor/clinic/templates/email/ru/") for n in expected)
    missing, extra = sorted(expected - names), sorted(names - expected)
    assert not missing, ("in the checkout, missing from the wheel (pyproject.toml: "
                         f"[tool.setuptools] packages, package-data): {missing}")
    assert not extra, f"in the wheel, not in the checkout: {extra}"
    assert "reactor = reactor.cli:main" in entry_points


def test_the_installed_wheel_migrates_runs_reports_mails_and_serves_the_dashboard(
        installed: Installed, empty_database_url: str, tmp_path: Path) -> None:
    # 1. What the new virtualenv imports: the installed package and its own files only.
    probe = run([str(installed.bin / "python"), "-c", (
        "import json, sys, reactor, reactor.clinic.resources as r, reactor.engine.web as w;"
        "print(json.dumps({'reactor': reactor.__file__, 'migrations': str(r.MIGRATIONS_DIR),"
        " 'templates': str(r.TEMPLATES_DIR), 'dashboard': str(w.DASHBOARD),"
        " 'path': sys.path}))")], cwd=installed.work, env=clean_env()).stdout
    found = json.loads(probe)
    package = Path(found["reactor"]).resolve().parent
    assert package.is_relative_to(installed.venv.resolve()), found["reactor"]
    assert str(HOME) not in found["path"]
    # The package's own folders (not REACTOR_HOME's, not a source tree's fallback).
    assert Path(found["migrations"]).resolve() == package / "clinic" / "migrations"
    assert Path(found["templates"]).resolve() == package / "clinic" / "templates"
    assert Path(found["dashboard"]).resolve() == package / "engine" / "dashboard" / "index.html"
    checkout_migrations = sorted(p.name for p in (HOME / "migrations").glob("*.sql"))
    assert sorted(p.name for p in Path(found["migrations"]).glob("*.sql")) == checkout_migrations

    # 2. `reactor migrate` on a fresh database, from an empty folder.
    reactor = str(installed.bin / "reactor")
    run([reactor, "migrate"], cwd=installed.work,
        env=clean_env(DATABASE_URL=empty_database_url))
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        applied = {str(row[0]) for row in conn.execute(
            "SELECT version FROM supabase_migrations.schema_migrations")}
    assert {name.split("_", 1)[0] for name in checkout_migrations} <= applied

    # 3. `reactor run`: a completed checkup gives a PDF report and mails.
    reports, outbox, log = tmp_path / "reports", tmp_path / "outbox", tmp_path / "reactor.log"
    env = clean_env(DATABASE_URL=empty_database_url, LOG_FORMAT="json", LOG_LEVEL="info",
                    EMAIL_PROVIDER="file", EMAIL_OUTBOX_DIR=str(outbox),
                    REPORTS_DIR=str(reports), FEED_PORT="0", METRICS_PORT="0")
    with log.open("wb") as out:
        proc = subprocess.Popen([reactor, "run"], cwd=installed.work, env=env,
                                stdout=out, stderr=out)
    try:
        http_port = ports(proc, log).http  # the kernel's free ports, read from the log
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            user = f.profile(conn, email="mama@example.com", locale="ru")
            checkup = f.assessment(conn, user, results=RESULTS)
            conn.execute("UPDATE public.assessments SET status = 'completed' WHERE id = %s",
                         (checkup,))
        report = reports / str(user) / f"{checkup}.pdf"

        def done() -> bool:
            assert proc.poll() is None, log.read_text()[-4000:]
            return report.is_file() and len(list(outbox.glob("*.eml"))) >= 2

        wait_until(done, within_s=30, what="the PDF report and two mails (completed, ready)")
        assert report.read_bytes().startswith(b"%PDF-")
        mails = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                 for p in sorted(outbox.glob("*.eml"))]
        assert {str(m["To"]) for m in mails} == {"mama@example.com"}
        attached = [part.get_content_type() for m in mails for part in m.iter_attachments()]
        assert attached == ["application/pdf"]  # the "report ready" mail carries the report

        # 4. The dashboard page from the package data.
        page = httpx.get(f"http://127.0.0.1:{http_port}/", timeout=10)
        assert page.status_code == 200, page.text[:500]
        assert page.headers["content-type"].startswith("text/html")
        assert page.text == Path(found["dashboard"]).read_text()
        assert "<html" in page.text.lower()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-4000:]
    errors = [e for e in log_lines(log) if e.get("level") in ("error", "critical")]
    assert errors == []



WORKER = '''
from pathlib import Path

from reactor.engine import App, EngineSettings, Job, MessageModel, Processor, Queue


class Greeting(MessageModel):
    name: str


class GreetingProcessor(Processor[Greeting]):
    model = Greeting

    async def handle(self, job: Job[Greeting]) -> None:
        await self.db.run(lambda c: c.execute(
            "INSERT INTO public.greetings (name, greeted_by) VALUES (%s, %s) "
            "ON CONFLICT (name) DO NOTHING", (job.message.name, job.msg_id)))


def build(settings: EngineSettings | None = None) -> App:
    return App(name="greeter", settings=settings or EngineSettings,
               queues=(Queue("greeting_queue", GreetingProcessor),),
               migrations=Path(__file__).parent / "migrations")
'''

WORKER_TEST = '''
from reactor.testing import enqueue, of_type, sql, wait_for_event


async def test_a_greeting_is_recorded_once(running_reactor, reactor_database):
    with running_reactor.bus.subscribe() as sub:
        msg_id = await enqueue(reactor_database, "greeting_queue", {"name": "Anna"})
        await wait_for_event(sub, of_type("job.succeeded", msg_id))
    assert await sql(reactor_database, "SELECT name FROM public.greetings") == [("Anna",)]
'''


def test_the_wheels_pytest_plugin_tests_a_worker_outside_the_repository(
        installed: Installed, tmp_path: Path) -> None:
    """docs/engine.md, "Testing your worker": a project of its own (a worker, its
    migration, one test), in a folder with nothing of this checkout, tested with the
    fixtures the installed wheel registers for pytest (reactor.testing)."""
    project = tmp_path / "greeter"
    (project / "greeter" / "migrations").mkdir(parents=True)
    (project / "greeter" / "__init__.py").write_text("")
    (project / "greeter" / "worker.py").write_text(WORKER)
    (project / "greeter" / "migrations" / "001_greetings.sql").write_text(
        "CREATE TABLE public.greetings (name text PRIMARY KEY, greeted_by bigint NOT NULL);\n"
        "SELECT reactor.register_queue('greeting_queue');\n")
    (project / "tests").mkdir()
    (project / "tests" / "test_worker.py").write_text(WORKER_TEST)
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\ntrio_mode = true\nreactor_app = "greeter.worker:build"\n'
        'pythonpath = ["."]\n')
    plugin = run([str(installed.bin / "python"), "-c", "import reactor.testing as t; "
                  "print(t.__file__)"], cwd=project, env=clean_env()).stdout.strip()
    assert Path(plugin).resolve().is_relative_to(installed.venv.resolve()), plugin
    result = run([str(installed.bin / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "-p", "no:xdist", "tests"], cwd=project, env=clean_env(), timeout_s=240)
    assert "1 passed" in result.stdout, result.stdout
