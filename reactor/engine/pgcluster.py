"""A private PostgreSQL cluster with pg_cron, for the tests and `reactor dev`.

Postgres refuses to run as root, so when we are root every server command
runs as the `postgres` OS user (`runuser`), in a directory that user owns.
The cluster listens on 127.0.0.1 only: it is never exposed beyond loopback.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

__all__ = ["PgCluster", "PgClusterError", "check_pg_cron", "find_pg_bin", "free_port",
           "start_failure_reason"]

# pg_cron runs its jobs in exactly this database of the cluster.
CRON_DATABASE = "postgres"
SERVER_USER = "postgres"


class PgClusterError(RuntimeError):
    """The cluster could not be created or started; the message names the fix."""


def find_pg_bin() -> Path:
    """Return the bin directory of the newest installed PostgreSQL server.

    PG_BIN overrides the search (e.g. a non-Debian layout).
    """
    override = os.environ.get("PG_BIN")
    candidates = [Path(override)] if override else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise PgClusterError(
        "PostgreSQL server binaries not found: "
        "apt-get install -y postgresql-15 postgresql-15-cron (or set PG_BIN)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_pg_cron(bin_dir: Path) -> None:
    """Raise PgClusterError (naming the package) unless pg_cron is installed for bin_dir."""
    libdir = subprocess.run(
        [str(bin_dir / "pg_config"), "--pkglibdir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if libdir and not (Path(libdir) / "pg_cron.so").exists():
        major = bin_dir.parent.name
        raise PgClusterError(
            f"pg_cron is not installed: apt-get install -y postgresql-{major}-cron"
        )


# "2026-11-26 12:37:24.713 UTC [21435] FATAL:  lock file ..." → "FATAL: lock file ..."
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+ \S+ \[\d+\] ")
# Causes that Postgres logs below FATAL, before the FATAL that only reports the effect.
_CAUSES = ("Address already in use", "could not bind", "Permission denied", "No space left")
# Lines that hold a cause's words but never say why a start failed: the server user
# cannot enter the caller's working directory (a checkout under /root, a 0700 mktemp).
# Written bare, before logging starts; a FATAL about the data directory keeps its prefix.
_NOISE = re.compile(r'^could not change directory to ".*": Permission denied$')


def start_failure_reason(output: str) -> str:
    """The one line of a failed start's log that says why (with its HINT, if any).

    Postgres' log of a failed start begins with version banners and ends with
    "database system is shut down"; the cause is a FATAL or PANIC line, or a
    lower-level line just before it (a port in use is a LOG line).
    """
    lines = [" ".join(_LOG_PREFIX.sub("", line).split()) for line in output.splitlines()]
    lines = [line for line in lines if line and not _NOISE.match(line)]
    if not lines:
        return "no reason given in the log"

    def with_hint(i: int) -> str:
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        return f"{lines[i]} ({nxt})" if nxt.startswith("HINT:") else lines[i]

    for test in (lambda line: any(cause in line for cause in _CAUSES),
                 lambda line: line.startswith(("FATAL:", "PANIC:")),
                 lambda line: line.startswith("ERROR:"),
                 lambda line: line.startswith("pg_ctl:")):
        for i, line in enumerate(lines):
            if test(line):
                return with_hint(i)
    return lines[-1]


@dataclass
class PgCluster:
    """One cluster in `base_dir` (data in base_dir/data, log in base_dir/postgres.log).

    Args:
        base_dir: where the cluster lives; created if absent.
        port: TCP port on 127.0.0.1.
        durable: False turns fsync off (tests); True keeps Postgres' defaults.
        pg_cron: preload pg_cron (False only to test the refusal without it).
        superuser: the bootstrap superuser's name (`supabase_admin` for a
            Supabase-like cluster, where `postgres` is an ordinary role).
    """

    base_dir: Path
    port: int
    durable: bool = False
    pg_cron: bool = True
    superuser: str = "postgres"

    def __post_init__(self) -> None:
        self.base_dir = self.base_dir.resolve()
        self.bin_dir = find_pg_bin()
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self._as_postgres = os.geteuid() == 0

    # -- commands --------------------------------------------------------
    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a server command as the server user, from a directory it may enter (its own
        base directory): a caller's cwd under /root would cost a warning in every log."""
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        cwd = self.base_dir if self.base_dir.is_dir() else None
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)

    def _own(self, path: Path) -> None:
        if self._as_postgres:
            pw = pwd.getpwnam(SERVER_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def _prepare_base_dir(self) -> None:
        if self._as_postgres:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise PgClusterError(
                    "the postgres OS user is missing: apt-get install -y postgresql-15"
                ) from exc
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._own(self.base_dir)

    def initdb_only(self) -> None:
        """initdb alone: a data directory with none of our settings (which `init` writes),
        fit to be copied by `init(copy_of=...)`."""
        self._prepare_base_dir()
        result = self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.superuser,
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
        )
        if result.returncode != 0:
            hint = ""
            if "Permission denied" in result.stderr:
                hint = f" (the postgres user must be able to enter every parent of {self.base_dir})"
            raise PgClusterError(f"initdb failed: {result.stderr.strip()}{hint}")

    def init(self, *, copy_of: Path | None = None) -> None:
        """initdb with pg_cron preloaded and loopback-only settings (idempotent).

        copy_of: instead of initdb, a copy of this data directory, made by `initdb_only`
        with the same superuser (a test suite's clusters are all alike, and initdb costs
        ~2 s of CPU where a copy costs ~0.3 s).
        """
        if self.initialized:
            return
        if self.pg_cron:
            check_pg_cron(self.bin_dir)
        if copy_of is None:
            self.initdb_only()
        else:
            self._prepare_base_dir()
            result = self._run("cp", "-a", "--", str(copy_of), str(self.data_dir))
            if result.returncode != 0:
                raise PgClusterError(f"copying the data directory {copy_of} failed: "
                                     f"{result.stderr.strip()}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.data_dir}'",
            "max_connections": "200",
            "log_min_messages": "warning",
        }
        if self.pg_cron:
            settings |= {"shared_preload_libraries": "'pg_cron'",
                         "cron.database_name": f"'{CRON_DATABASE}'"}
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# written by reactor.engine.pgcluster\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> None:
        """Start the server on 127.0.0.1:port and wait until it accepts connections.

        Raises:
            PgClusterError: one line, led by the log line that says why (the port is
                taken, another server uses the data directory, …), then the log's path.
        """
        if not self.log_file.exists():
            self.log_file.touch()
            self._own(self.log_file)
        offset = self.log_file.stat().st_size  # only this attempt's lines count
        result = self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", f"-p {self.port}", "-w", "-t", "60", "start",
        )
        if result.returncode != 0:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                fresh = log.read().decode("utf-8", errors="replace")
            reason = start_failure_reason(f"{fresh}\n{result.stderr}\n{result.stdout}")
            raise PgClusterError(f"postgres did not start on port {self.port}: {reason} "
                                 f"(full log: {self.log_file})")

    def running(self) -> bool:
        """A server runs on this data directory (e.g. left behind by a killed process)."""
        if not self.initialized:
            return False
        return self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir),
                         "status").returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast or immediate); no error if it is not running."""
        if self.initialized:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode,
                      "-w", "stop")

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- databases -------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        return self.url_as(self.superuser, dbname)

    def url_as(self, user: str, dbname: str = "postgres") -> str:
        """The URL of `dbname` for `user` (every local login is trusted)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE name [TEMPLATE template]; returns its URL."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
