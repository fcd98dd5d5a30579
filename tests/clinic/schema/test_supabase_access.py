"""What the API roles can reach, checked exhaustively (migration 040, docs/supabase.md).

Every test here runs on plain Postgres and on the Supabase-like database
(tests/supabase_db.py). A fresh database is migrated as its owner; every
function, table, view, sequence and schema that did not exist before is
enumerated; then, connected as `authenticator` and switching roles with SET
ROLE like PostgREST, each API role's reach is measured and compared with the
table in docs/supabase.md.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from reactor.clinic.resources import MIGRATIONS_DIR
from reactor.clinic.schema import MigrationError, load_migrations, migrate
from reactor.engine import queries
from reactor.engine.pgcluster import PgCluster
from tests import factories as f
from tests.harness import CHECKOUT, eventually, running_reactor
from tests.supabase_db import AUTHENTICATOR, BASE_DB, OWNER, SupabaseCluster

DOC = CHECKOUT / "docs" / "supabase.md"
# The API's client roles, and PostgREST's login role itself before it switches.
CLIENTS = ("anon", "authenticated", AUTHENTICATOR)
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")

# Objects by catalog and oid: (classid, objid) as pg_depend names them.
SNAPSHOT = """
SELECT 'pg_proc', oid FROM pg_catalog.pg_proc
UNION ALL SELECT 'pg_class', oid FROM pg_catalog.pg_class WHERE relkind IN ('r','p','v','m','S','f')
UNION ALL SELECT 'pg_namespace', oid FROM pg_catalog.pg_namespace
"""
DESCRIBE_FUNCTIONS = """
SELECT p.oid, n.nspname, format('%%s(%%s)', p.proname, oidvectortypes(p.proargtypes)),
       p.prosecdef, p.prokind, p.prorettype = 'pg_catalog.trigger'::regtype,
       (SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'),
       format('%%s %%I.%%I(%%s)', CASE p.prokind WHEN 'p' THEN 'CALL' ELSE 'SELECT' END,
              n.nspname, p.proname,
              (SELECT coalesce(string_agg('NULL::' || format_type(t, NULL), ', ' ORDER BY i), '')
                 FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a (t, i)))
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE p.oid = ANY (%s)
"""
DESCRIBE_RELATIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind,
       (SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = ANY (%s)
"""
# What the current role may do with each object: schema USAGE and the object's privilege.
REACH = """
SELECT 'function', p.oid, 'EXECUTE'
  FROM pg_proc p
 WHERE p.oid = ANY (%(procs)s)
   AND has_schema_privilege(p.pronamespace, 'USAGE') AND has_function_privilege(p.oid, 'EXECUTE')
UNION ALL
SELECT 'relation', c.oid, priv
  FROM pg_class c
 CROSS JOIN LATERAL unnest(CASE WHEN c.relkind = 'S' THEN ARRAY['USAGE', 'SELECT', 'UPDATE']
                                ELSE %(table_privileges)s::text[] END) AS priv
 WHERE c.oid = ANY (%(rels)s)
   AND has_schema_privilege(c.relnamespace, 'USAGE')
   AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, priv)
            ELSE has_table_privilege(c.oid, priv)
                 OR (priv IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')
                     AND has_any_column_privilege(c.oid, priv)) END
UNION ALL
SELECT 'schema', n.oid, priv
  FROM pg_namespace n CROSS JOIN unnest(ARRAY['USAGE', 'CREATE']) AS priv
 WHERE n.oid = ANY (%(schemas)s) AND has_schema_privilege(n.oid, priv)
"""


@dataclass(frozen=True)
class Function:
    oid: int
    schema: str
    signature: str          # name(argtypes), as docs/supabase.md writes it
    secdef: bool
    kind: str
    is_trigger: bool
    extension: str | None
    call: str               # the function called with NULLs


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str
    extension: str | None


@dataclass
class Installed:
    """A database migrated in the test, and what the migration run created."""

    flavor: str
    owner_url: str
    client_url: str         # as authenticator
    functions: list[Function]
    relations: list[Relation]
    schemas: dict[int, str]

    def functions_of(self, schema: str) -> dict[str, Function]:
        return {fn.signature: fn for fn in self.functions
                if fn.schema == schema and fn.extension is None}

    def relations_of(self, schema: str) -> dict[str, Relation]:
        return {r.name: r for r in self.relations if r.schema == schema and r.extension is None}


def _snapshot(url: str) -> set[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return {(str(c), int(o)) for c, o in conn.execute(SNAPSHOT).fetchall()}


def _created(flavor: str, owner_url: str, client_url: str,
             before: set[tuple[str, int]]) -> Installed:
    new = _snapshot(owner_url) - before
    procs = [o for c, o in new if c == "pg_proc"]
    rels = [o for c, o in new if c == "pg_class"]
    with psycopg.connect(owner_url) as conn:
        functions = [Function(*row) for row in conn.execute(DESCRIBE_FUNCTIONS, (procs,))]
        relations = [Relation(*row) for row in conn.execute(DESCRIBE_RELATIONS, (rels,))]
        schemas: dict[int, str] = dict(conn.execute(  # sessions' temporary schemas aside
            "SELECT oid, nspname FROM pg_namespace WHERE oid = ANY (%s) "
            "AND nspname !~ '^pg_(toast_)?temp_'",
            ([o for c, o in new if c == "pg_namespace"],)).fetchall())
    return Installed(flavor, owner_url, client_url, functions, relations, schemas)


@pytest.fixture(scope="session")
def plain_authenticator(pg_cluster: PgCluster, template_db: str) -> str:
    """PostgREST's login role on the plain cluster (001 made the roles it switches to)."""
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(f"""
            DO $$ BEGIN
                IF to_regrole('{AUTHENTICATOR}') IS NULL THEN
                    CREATE ROLE {AUTHENTICATOR} LOGIN NOINHERIT;
                END IF;
            END $$;
            GRANT anon, authenticated, service_role TO {AUTHENTICATOR}""")
    return AUTHENTICATOR


@pytest.fixture
def unmigrated(request: pytest.FixtureRequest, db_flavor: str) -> Iterator[tuple[str, str]]:
    """(owner URL, authenticator URL) of a database ready for its first `reactor migrate`:
    plain, an empty database with pgmq's SQL; Supabase-like, as Supabase prepares it."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    if db_flavor == "supabase":
        supabase: SupabaseCluster = request.getfixturevalue("supabase_cluster")
        owner_url = supabase.clone(name, template=BASE_DB)
        try:
            yield owner_url, supabase.authenticator_url(name)
        finally:
            supabase.drop(name)
        return
    from pgmq.install import get_embedded_install_sql

    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    authenticator = request.getfixturevalue("plain_authenticator")
    owner_url = cluster.create_database(name)
    try:
        with psycopg.connect(owner_url, autocommit=True) as conn, conn.transaction():
            conn.execute(get_embedded_install_sql())
        yield owner_url, cluster.url_as(authenticator, name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def installed(unmigrated: tuple[str, str], db_flavor: str) -> Installed:
    owner_url, client_url = unmigrated
    before = _snapshot(owner_url)
    migrate(owner_url)
    return _created(db_flavor, owner_url, client_url, before)


def documented() -> dict[str, set[str]]:
    """docs/supabase.md's table: object in `public` → service_role's privileges.

    Also checks that the table says clients get nothing.
    """
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- api-surface:start -->")[1].split("<!-- api-surface:end -->")[0]
    rows: dict[str, set[str]] = {}
    for line in table.strip().splitlines()[2:]:
        obj, clients, service, _why = (c.strip() for c in line.strip().strip("|").split("|"))
        assert clients == "—", f"docs/supabase.md: clients may use {obj}?"
        name = obj.strip("`")
        rows[name] = set() if service == "—" else {p.strip() for p in service.split(",")}
    return rows


def reach(installed: Installed, role: str) -> set[tuple[str, str, str]]:
    """(kind, object, privilege) that `role` may use, measured as PostgREST would be:
    logged in as authenticator, switched with SET ROLE. Extensions' own objects aside."""
    names: dict[tuple[str, int], str] = {}
    names |= {("function", fn.oid): f"{fn.schema}.{fn.signature}"
              for fn in installed.functions if fn.extension is None}
    names |= {("relation", r.oid): f"{r.schema}.{r.name}"
              for r in installed.relations if r.extension is None}
    names |= {("schema", oid): name for oid, name in installed.schemas.items()}
    with psycopg.connect(installed.client_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (AUTHENTICATOR,)
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        rows = conn.execute(REACH, {
            "procs": [oid for kind, oid in names if kind == "function"],
            "rels": [oid for kind, oid in names if kind == "relation"],
            "schemas": list(installed.schemas),
            "table_privileges": list(TABLE_PRIVILEGES)}).fetchall()
    return {(kind, names[(kind, oid)], priv) for kind, oid, priv in rows}


def assert_clients_reach_nothing(installed: Installed) -> None:
    """anon, authenticated (and authenticator itself): no privilege on anything
    the migrations created."""
    for role in CLIENTS:
        assert reach(installed, role) == set(), f"{role} on {installed.flavor}"
    # Extensions' own objects: only pgcrypto's, only where 010 had to create it
    # (plain Postgres; docs/supabase.md says so).
    extensions = ({fn.extension for fn in installed.functions if fn.extension}
                  | {r.extension for r in installed.relations if r.extension})
    assert extensions <= ({"pgcrypto"} if installed.flavor == "plain" else set())


def probe_clients(installed: Installed) -> None:
    """Call every function and read every relation as each client role: all refused."""
    with psycopg.connect(installed.client_url) as conn:
        for role in CLIENTS:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                for fn in installed.functions:
                    if fn.extension or fn.kind not in ("f", "p"):
                        continue
                    with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                        conn.execute(fn.call.encode())
                for rel in installed.relations:
                    if rel.extension:
                        continue
                    with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                        conn.execute(sql.SQL("SELECT FROM {}.{} LIMIT 0").format(
                            sql.Identifier(rel.schema), sql.Identifier(rel.name)))


# -- the tests ---------------------------------------------------------------------------
def test_enumeration_covers_every_object_the_migration_files_define(installed: Installed) -> None:
    """Every function and table named in migrations/*.sql that still exists was enumerated."""
    defined = re.compile(
        r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE|TABLE(?:\s+IF\s+NOT\s+EXISTS)?|"
        r"(?:MATERIALIZED\s+)?VIEW|SEQUENCE(?:\s+IF\s+NOT\s+EXISTS)?)\s+([a-z_]+)\.([a-z_0-9]+)",
        re.IGNORECASE)
    enumerated = ({(fn.schema, fn.signature.split("(")[0]) for fn in installed.functions}
                  | {(r.schema, r.name) for r in installed.relations})
    names = {m.groups() for mig in load_migrations() for m in defined.finditer(mig.sql)}
    assert len(names) > 30
    with psycopg.connect(installed.owner_url) as conn:
        for schema, name in sorted(names):
            exists = conn.execute(
                "SELECT 1 FROM pg_proc WHERE pronamespace = to_regnamespace(%(s)s) "
                "AND proname = %(n)s UNION ALL SELECT 1 FROM pg_class "
                "WHERE relnamespace = to_regnamespace(%(s)s) AND relname = %(n)s",
                {"s": schema, "n": name}).fetchall()
            if exists:
                assert (schema, name) in enumerated, f"{schema}.{name} not enumerated"
    # The queues' tables (pgmq.create in 031) are the migrations' too.
    assert {"q_email_queue", "a_email_queue"} <= set(installed.relations_of("pgmq"))


def test_clients_reach_nothing_the_migrations_created(installed: Installed) -> None:
    assert_clients_reach_nothing(installed)
    probe_clients(installed)


def test_docs_list_exactly_what_the_reactor_keeps_in_public(installed: Installed) -> None:
    in_public = set(installed.functions_of("public")) | set(installed.relations_of("public"))
    assert in_public == set(documented())


def test_service_role_uses_exactly_the_documented_api(installed: Installed) -> None:
    docs = documented()
    reachable = reach(installed, "service_role")
    functions = {name for kind, name, _ in reachable if kind == "function"}
    assert functions == {f"public.{obj}" for obj, privs in docs.items() if "EXECUTE" in privs}
    for rel in installed.relations_of("public"):
        granted = {p for kind, name, p in reachable if name == f"public.{rel}"}
        if installed.flavor == "supabase" and rel != "email_ledger":
            assert docs[rel] <= granted, rel      # plus Supabase's own default ALL
        else:
            assert granted == docs[rel], rel
    # Nothing outside public: not schema reactor, pgmq's queues, the migration log.
    assert {name for kind, name, _ in reachable if not name.startswith("public.")} == set()
    with psycopg.connect(installed.client_url) as conn:
        conn.execute("SET ROLE service_role")
        for schema in ("reactor", "pgmq", "supabase_migrations"):
            assert conn.execute("SELECT has_schema_privilege(%s, 'USAGE')",
                                (schema,)).fetchone() == (False,), schema


def test_service_role_round_trip_through_the_wrappers_and_helpers(installed: Installed) -> None:
    with psycopg.connect(installed.client_url, autocommit=True) as conn:
        conn.execute("SET ROLE service_role")
        [(msg_id,)] = conn.execute(
            "SELECT public.pgmq_send('analytics_queue', '{\"event\": \"rpc\"}')").fetchall()
        conn.execute("SELECT public.queue_email_task('a@example.com', NULL, 'payment_failed')")
        conn.execute("SELECT public.update_appointment_statuses()")
        conn.execute("SELECT public.send_appointment_reminders()")
        [read] = conn.execute("SELECT * FROM public.pgmq_read('analytics_queue', 30, 5)").fetchall()
        assert read[0] == msg_id
        assert conn.execute("SELECT public.pgmq_archive('analytics_queue', %s)",
                            (msg_id,)).fetchone() == (True,)
        assert conn.execute("SELECT queue_length FROM public.pgmq_metrics('email_queue')"
                            ).fetchone() == (1,)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown queue"):
            conn.execute("SELECT public.pgmq_send('secret', '{}')")


def test_enqueue_keeps_its_size_limit_after_the_move(installed: Installed) -> None:
    """040 redefines public.enqueue (its queue check moved): 036's limit still holds."""
    with psycopg.connect(installed.client_url, autocommit=True) as conn:
        conn.execute("SET ROLE service_role")
        big = json.dumps({"blob": "x" * 300_000})
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than the limit"):
            conn.execute("SELECT public.enqueue('analytics_queue', %s::jsonb)", (big,))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown queue"):
            conn.execute("SELECT public.enqueue('secret_queue', '{}')")
        assert conn.execute("SELECT public.enqueue('analytics_queue', '{\"n\": 1}')"
                            ).fetchone() is not None


def test_client_insert_enqueues_through_the_trigger_without_pgmq_rights(
        installed: Installed) -> None:
    """A signed-in client adds its own appointment and completes its own checkup
    (a test-only policy standing in for the app's); the SECURITY DEFINER triggers
    queue the mails; the client itself can touch neither pgmq nor enqueue."""
    with psycopg.connect(installed.owner_url, autocommit=True) as owner:
        user = f.profile(owner, email="client@example.com")
        other = f.profile(owner)
        owner.execute("""
            GRANT SELECT, INSERT, UPDATE ON public.appointments, public.assessments
                TO authenticated;
            CREATE POLICY own_rows ON public.appointments FOR ALL TO authenticated
                USING (user_id = (current_setting('request.jwt.claims', true)::jsonb
                                  ->> 'sub')::uuid)
                WITH CHECK (user_id = (current_setting('request.jwt.claims', true)::jsonb
                                       ->> 'sub')::uuid);
            CREATE POLICY own_rows ON public.assessments FOR ALL TO authenticated
                USING (user_id = (current_setting('request.jwt.claims', true)::jsonb
                                  ->> 'sub')::uuid)
                WITH CHECK (user_id = (current_setting('request.jwt.claims', true)::jsonb
                                       ->> 'sub')::uuid)""")
    with psycopg.connect(installed.client_url) as conn, conn.transaction():  # one request
        conn.execute("SET LOCAL ROLE authenticated")
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"sub": str(user), "role": "authenticated"}),))
        conn.execute("INSERT INTO public.appointments (user_id, specialist_name, scheduled_at) "
                     "VALUES (%s, 'Dr. X', now() + interval '2 days')", (user,))
        conn.execute("INSERT INTO public.assessments (user_id, status) "
                     "VALUES (%s, 'completed')", (user,))
        assert conn.execute("SELECT has_schema_privilege('pgmq', 'USAGE'), "
                            "has_schema_privilege('reactor', 'USAGE')").fetchone() == (
                                False, False)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("SELECT public.enqueue('email_queue', '{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("INSERT INTO public.appointments (user_id, specialist_name, "
                         "scheduled_at) VALUES (%s, 'Dr. Y', now())", (other,))
    with psycopg.connect(installed.owner_url) as owner:
        mails = f.queued(owner, "email_queue")
        assert sorted((m["template"], m["to"]) for m in mails) == [
            ("appointment_confirmation", "client@example.com"),
            ("checkup_completed", "client@example.com")]
        [confirmation] = [m for m in mails if m["template"] == "appointment_confirmation"]
        assert confirmation["variables"]["specialist_name"] == "Dr. X"
        assert len(f.queued(owner, "report_generation_queue")) == 1
        stamped = owner.execute("SELECT completed_at IS NOT NULL FROM public.assessments "
                                "WHERE user_id = %s", (user,)).fetchone()
        assert stamped == (True,)   # reactor.stamp_checkup_completed_at ran for the client


async def test_reactor_runs_as_the_owner_and_mails_what_a_client_booked(
        installed: Installed, tmp_path: Path) -> None:
    """`reactor run` connects as the migration owner (`postgres` on Supabase, no
    superuser): it drains the queues and records in schema `reactor` and the ledger."""
    with psycopg.connect(installed.owner_url, autocommit=True) as owner:
        user = f.profile(owner, email="booked@example.com", locale="en")
        owner.execute("GRANT INSERT ON public.appointments TO authenticated; "
                      "CREATE POLICY book ON public.appointments FOR INSERT TO authenticated "
                      "WITH CHECK (true)")
    with psycopg.connect(installed.client_url) as conn, conn.transaction():
        conn.execute("SET LOCAL ROLE authenticated")
        conn.execute("INSERT INTO public.appointments (user_id, specialist_name, scheduled_at) "
                     "VALUES (%s, 'Dr. Z', now() + interval '3 days')", (user,))
    outbox = tmp_path / "outbox"
    async with running_reactor(installed.owner_url, EMAIL_OUTBOX_DIR=str(outbox)):
        [mail] = await eventually(lambda: list(outbox.glob("*.eml")), within_s=60)
        await eventually(lambda: _done(installed.owner_url), within_s=60)
    assert "booked@example.com" in mail.read_text(encoding="utf-8", errors="replace")


def _done(url: str) -> bool:
    """The mail is recorded as sent, the analytics event stored, both queues empty."""
    with psycopg.connect(url) as conn:
        row = conn.execute("""
            SELECT (SELECT array_agg(status) FROM public.email_ledger) = ARRAY['sent'],
                   (SELECT count(*) FROM public.analytics_events
                     WHERE event = 'appointment_created') = 1,
                   NOT EXISTS (SELECT 1 FROM pgmq.q_email_queue)
                   AND NOT EXISTS (SELECT 1 FROM pgmq.q_analytics_queue)""").fetchone()
    return row == (True, True, True)


def test_a_later_migration_is_locked_down_by_rule(installed: Installed, tmp_path: Path) -> None:
    """Whatever a new migration adds, wherever, starts unreachable for clients."""
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    (migrations / "900_later.sql").write_text("""
        CREATE FUNCTION public.later_helper(x integer) RETURNS integer
            LANGUAGE sql IMMUTABLE SET search_path = '' AS $$ SELECT x + 1 $$;
        CREATE FUNCTION public.later_entry() RETURNS integer
            LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$ SELECT 1 $$;
        CREATE FUNCTION public.later_trigger() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$ BEGIN RETURN NEW; END $$;
        CREATE PROCEDURE public.later_procedure() LANGUAGE sql AS $$ SELECT 1 $$;
        CREATE TABLE public.later_table (id bigserial PRIMARY KEY, note text);
        CREATE VIEW public.later_view AS SELECT email FROM public.profiles;
        CREATE SEQUENCE public.later_sequence;
        CREATE SCHEMA later;
        GRANT USAGE ON SCHEMA later TO PUBLIC;
        CREATE TABLE later.things (id int);
        CREATE FUNCTION later.thing() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
    """)
    before = _snapshot(installed.owner_url)
    assert migrate(installed.owner_url, migrations).applied == ["900_later"]
    later = _created(installed.flavor, installed.owner_url, installed.client_url, before)
    assert len(later.functions) == 5
    assert {r.name for r in later.relations} >= {"later_table", "later_view",
                                                 "later_sequence", "things"}
    assert_clients_reach_nothing(later)
    probe_clients(later)
    service = reach(later, "service_role")
    assert {name for kind, name, _ in service if kind == "function"} == {
        "public.later_entry()"}
    assert {name for kind, name, _ in service if kind == "schema"} == set()


def test_upgrade_from_before_040_closes_what_was_open(unmigrated: tuple[str, str],
                                                      db_flavor: str) -> None:
    """An installation migrated by an earlier reactor (no lock-down, no 040) is
    fixed by the next `reactor migrate`."""
    owner_url, client_url = unmigrated
    before = _snapshot(owner_url)
    old = [m for m in load_migrations() if m.version < "040"]
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(queries.CREATE_MIGRATIONS_TABLE)
        for m in old:   # what an earlier `reactor migrate` did
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(queries.RECORD_MIGRATION, (m.version, m.name, [m.sql], m.checksum))
        if db_flavor == "supabase":
            leaked = conn.execute("SELECT has_function_privilege('anon', "
                                  "'public.reactor_queue_names()', 'EXECUTE')").fetchone()
            assert leaked == (True,)   # the leak of issue 15, reproduced
    report = migrate(owner_url)
    # The engine's line first (it did not exist then), then the clinic's from 040 on.
    assert report.applied[0] == "engine_001_queue_registry"
    assert next(a for a in report.applied if not a.startswith("engine_")) == "040_api_surface"
    upgraded = _created(db_flavor, owner_url, client_url, before)
    # App tables existing before 040 keep their grants (they are the app's by now).
    apps = {"profiles", "assessments", "appointments", "payments", "reports", "analytics_events"}
    upgraded.relations = [r for r in upgraded.relations
                          if not (r.schema == "public" and r.name in apps)]
    assert_clients_reach_nothing(upgraded)
    probe_clients(upgraded)
    assert set(upgraded.functions_of("public")) == {
        k for k in documented() if "(" in k}
    with psycopg.connect(owner_url) as conn:
        gone = conn.execute("SELECT to_regprocedure('public.reactor_queue_names()'), "
                            "to_regprocedure('public.touch_updated_at()')").fetchone()
    assert gone == (None, None)


def test_cron_database_migrates_as_postgres_and_schedules_the_jobs(
        supabase_cluster: SupabaseCluster) -> None:
    """On Supabase `reactor migrate` runs as `postgres` (no superuser) in the database
    where the admin created pg_cron: the jobs are scheduled under `postgres`."""
    url = supabase_cluster.owner_url()
    report = migrate(url)
    assert report.pgmq == "present"
    with psycopg.connect(url) as conn:
        jobs: list[Any] = conn.execute(
            "SELECT jobname, username FROM cron.job ORDER BY jobname").fetchall()
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                            ).fetchone() == (False,)
    assert jobs == [("cleanup-old-assessments", OWNER), ("reactor-housekeeping", OWNER),
                    ("send-appointment-reminders", OWNER),
                    ("update-appointment-statuses", OWNER)]


def test_migrate_as_a_role_that_cannot_read_pg_cron_settings_says_what_to_grant(
        supabase_cluster: SupabaseCluster) -> None:
    with psycopg.connect(supabase_cluster.admin_url(), autocommit=True) as conn:
        conn.execute("""
            DO $$ BEGIN
                IF to_regrole('reactor_weak') IS NULL THEN
                    CREATE ROLE reactor_weak LOGIN;
                END IF;
            END $$""")
    url = supabase_cluster.cluster.url_as("reactor_weak", BASE_DB)
    with pytest.raises(MigrationError, match="GRANT pg_monitor TO that role"):
        migrate(url)
