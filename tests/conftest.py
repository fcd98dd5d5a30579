"""Shared fixtures: one throwaway Postgres 15 cluster (pg_cron preloaded, fsync
off) per test session, a template database migrated once, and a fresh clone
of it for every test (`CREATE DATABASE ... TEMPLATE`: isolated and fast).

pg_cron lives in the cluster's `postgres` database; the clones do not have
it, which is what migration 030 must cope with.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from reactor.logs import configure_logging
from reactor.migrate import migrate
from reactor.pgcluster import PgCluster, free_port

TEMPLATE_DB = "reactor_template"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="reactor-test-pg-")), free_port())
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def template_db(pg_cluster: PgCluster) -> str:
    migrate(pg_cluster.create_database(TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
def database_url(pg_cluster: PgCluster, template_db: str) -> Iterator[str]:
    """A migrated database of this test's own."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name, template=template_db)
    try:
        yield url
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def empty_database_url(pg_cluster: PgCluster) -> Iterator[str]:
    """An empty database (nothing migrated, no pgmq)."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name)
    try:
        yield url
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, as the superuser."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    """Warnings and errors only, as JSON (what production writes)."""
    configure_logging("warning", "json")
