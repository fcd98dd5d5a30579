"""A database prepared the way Supabase prepares its own, for the database tests.

Built from what Supabase documents about its images (no file of theirs is
copied): the bootstrap superuser is `supabase_admin`; `postgres` is an
ordinary role (CREATEDB CREATEROLE REPLICATION BYPASSRLS) that owns the
database and runs the migrations; the API roles `anon`, `authenticated`,
`service_role` and the login role `authenticator` that PostgREST connects as
and switches from with SET ROLE; default privileges that give the three API
roles ALL on every table, function and sequence created in `public`, whether
`postgres` or `supabase_admin` creates it; extensions in schema `extensions`;
pg_cron created by the superuser in the cron database with its use granted
to `postgres`; pgmq installed by the superuser (the SQL of the `pgmq` PyPI
package, as the plain harness does) with the grants Supabase's Queues
integration gives.

What passes here and on plain Postgres holds where `postgres` cannot bypass
a missing grant.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from reactor.clinic.schema import migrate
from reactor.engine.pgcluster import CRON_DATABASE, PgCluster
from reactor.testing import start_on_a_free_port, throwaway_cluster

ADMIN = "supabase_admin"
OWNER = "postgres"                      # owns the app database, runs `reactor migrate`
API_ROLES = ("anon", "authenticated", "service_role")
AUTHENTICATOR = "authenticator"         # PostgREST's login role
BASE_DB = "supabase_base"               # prepared, not migrated
TEMPLATE_DB = "supabase_template"       # prepared and migrated

# Cluster-wide: the roles and the memberships Supabase gives `postgres` (the
# API roles, so the SQL editor may SET ROLE to try RLS policies; the built-in
# monitoring and read-all roles).
_ROLES = f"""
CREATE ROLE {OWNER} LOGIN NOSUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS;
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE {AUTHENTICATOR} LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO {AUTHENTICATOR};
GRANT anon, authenticated, service_role, {AUTHENTICATOR} TO {OWNER};
GRANT pg_monitor, pg_read_all_data, pg_signal_backend TO {OWNER};
ALTER ROLE {OWNER} SET search_path = "$user", public, extensions;
ALTER ROLE {ADMIN} SET search_path = "$user", public, extensions;
ALTER ROLE anon SET statement_timeout = '3s';
ALTER ROLE authenticated SET statement_timeout = '8s';
"""

# Per database, as the superuser: schemas, default privileges, extensions.
_DATABASE = f"""
CREATE SCHEMA extensions;
GRANT USAGE ON SCHEMA extensions TO {OWNER}, anon, authenticated, service_role;
CREATE EXTENSION pgcrypto WITH SCHEMA extensions;
CREATE EXTENSION "uuid-ossp" WITH SCHEMA extensions;

GRANT USAGE ON SCHEMA public TO {OWNER}, anon, authenticated, service_role;
GRANT ALL ON SCHEMA public TO {OWNER};
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
    GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
    GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
    GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {ADMIN} IN SCHEMA public
    GRANT ALL ON TABLES TO {OWNER}, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {ADMIN} IN SCHEMA public
    GRANT ALL ON FUNCTIONS TO {OWNER}, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {ADMIN} IN SCHEMA public
    GRANT ALL ON SEQUENCES TO {OWNER}, anon, authenticated, service_role;
"""

# After pgmq's SQL (run by the superuser): `postgres` creates and uses the
# queues (pgmq.create makes its tables as the caller); service_role gets
# pgmq.meta as the Queues integration grants it. anon and authenticated get
# nothing: pgmq is not an exposed schema.
_PGMQ_GRANTS = f"""
GRANT USAGE, CREATE ON SCHEMA pgmq TO {OWNER};
GRANT ALL ON ALL TABLES IN SCHEMA pgmq TO {OWNER};
GRANT ALL ON ALL SEQUENCES IN SCHEMA pgmq TO {OWNER};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO {OWNER};
ALTER DEFAULT PRIVILEGES FOR ROLE {ADMIN} IN SCHEMA pgmq GRANT ALL ON TABLES TO {OWNER};
ALTER DEFAULT PRIVILEGES FOR ROLE {ADMIN} IN SCHEMA pgmq GRANT ALL ON SEQUENCES TO {OWNER};
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
    ON pgmq.meta TO service_role;
"""

# In the cron database only: pg_cron by the superuser, its use for `postgres`.
_PG_CRON = f"""
CREATE EXTENSION pg_cron;
GRANT USAGE ON SCHEMA cron TO {OWNER};
GRANT ALL ON ALL TABLES IN SCHEMA cron TO {OWNER};
GRANT ALL ON ALL SEQUENCES IN SCHEMA cron TO {OWNER};
"""


@dataclass
class SupabaseCluster:
    """A running Supabase-like cluster; `base` and `template` databases are ready."""

    cluster: PgCluster

    def admin_url(self, dbname: str = CRON_DATABASE) -> str:
        return self.cluster.url_as(ADMIN, dbname)

    def owner_url(self, dbname: str = CRON_DATABASE) -> str:
        """As `postgres`: how `reactor migrate` and `reactor run` connect on Supabase."""
        return self.cluster.url_as(OWNER, dbname)

    def authenticator_url(self, dbname: str) -> str:
        return self.cluster.url_as(AUTHENTICATOR, dbname)

    def clone(self, name: str, template: str = TEMPLATE_DB) -> str:
        """A copy of `template` owned by `postgres`; returns the owner's URL."""
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(template), sql.Identifier(OWNER)))
        return self.owner_url(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    def remove(self) -> None:
        self.cluster.remove()


def _prepare_database(cluster: PgCluster, dbname: str, *, pg_cron: bool) -> None:
    """Make `dbname` look like Supabase's `postgres` database before any app migration."""
    from pgmq.install import get_embedded_install_sql

    with psycopg.connect(cluster.url_as(ADMIN, dbname), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(dbname), sql.Identifier(OWNER)))
        with conn.transaction():
            conn.execute(_DATABASE)
            conn.execute(get_embedded_install_sql())
            conn.execute(_PGMQ_GRANTS)
            if pg_cron:
                conn.execute(_PG_CRON)


def start_supabase_cluster() -> SupabaseCluster:
    """Create and start the cluster, prepare its databases, migrate the template.

    The cron database (`postgres`) is prepared with pg_cron but not migrated:
    a test migrates it when it needs the scheduled jobs.
    """
    cluster = throwaway_cluster("reactor-test-supabase-", superuser=ADMIN)
    supabase = SupabaseCluster(cluster)
    try:
        start_on_a_free_port(cluster)
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(_ROLES)
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(BASE_DB), sql.Identifier(OWNER)))
        _prepare_database(cluster, CRON_DATABASE, pg_cron=True)
        _prepare_database(cluster, BASE_DB, pg_cron=False)
        migrate(supabase.clone(TEMPLATE_DB, template=BASE_DB))
    except BaseException:
        cluster.remove()
        raise
    return supabase
