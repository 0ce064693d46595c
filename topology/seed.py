"""Demo database: filled on the old server, empty on the new one."""
from __future__ import annotations

import time

from psycopg2 import sql

from topology.postgres import Server

DATABASE = "app"
OWNER = "app"

SCHEMA_DDL = """
CREATE SCHEMA billing;
CREATE SCHEMA scratch;

CREATE TABLE public.accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.orders (
    id serial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES public.accounts (id),
    amount numeric(12,2) NOT NULL,
    note text
);
CREATE TABLE billing.invoices (
    id bigserial PRIMARY KEY,
    order_id int NOT NULL,
    total numeric NOT NULL,
    issued_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE billing.invoice_lines (
    invoice_id bigint NOT NULL,
    line_no int NOT NULL,
    sku text NOT NULL,
    PRIMARY KEY (invoice_id, line_no)
);
CREATE TABLE scratch.import_log (
    imported_at timestamptz NOT NULL DEFAULT now(),
    source text,
    message text
);
"""

# Extra rows are inserted and deleted again so that sequences run ahead of row counts and ids have gaps.
FILL_SQL = """
INSERT INTO public.accounts (email, created_at)
SELECT 'user' || g || '@example.com', now() - g * interval '1 minute'
FROM generate_series(1, %(accounts)s + %(accounts)s / 5) AS g;
DELETE FROM public.accounts WHERE id > %(accounts)s;

INSERT INTO public.orders (account_id, amount, note)
SELECT 1 + g %% %(accounts)s, round(((g * 7919) %% 100000) / 100.0, 2), 'order ' || g
FROM generate_series(1, %(orders)s + %(orders)s / 10) AS g;
DELETE FROM public.orders WHERE id %% 11 = 0;

INSERT INTO billing.invoices (order_id, total, issued_at)
SELECT o.id, o.amount * 1.19, now() - o.id * interval '1 second'
FROM public.orders AS o ORDER BY o.id LIMIT %(invoices)s + %(invoices)s / 4;
DELETE FROM billing.invoices WHERE id %% 5 = 0;

INSERT INTO billing.invoice_lines (invoice_id, line_no, sku)
SELECT i.id, n, 'SKU-' || (i.id * 31 + n) %% 997
FROM (SELECT id FROM billing.invoices ORDER BY id LIMIT %(invoice_lines)s / 2 + 1) AS i, generate_series(1, 2) AS n;

INSERT INTO scratch.import_log (imported_at, source, message)
SELECT now() - g * interval '1 hour', 'batch-' || g %% 7, 'imported row ' || g
FROM generate_series(1, %(import_log)s) AS g;
"""

GRANTS_SQL = """
GRANT USAGE ON SCHEMA public, billing TO replicator;
GRANT SELECT ON ALL TABLES IN SCHEMA public, billing TO replicator;
ALTER DEFAULT PRIVILEGES IN SCHEMA public, billing GRANT SELECT ON TABLES TO replicator;
"""


def row_counts(rows: int) -> dict[str, int]:
    return {
        "accounts": max(rows // 10, 10),
        "orders": max(rows // 2, 10),
        "invoices": max(rows // 5, 10),
        "invoice_lines": max(rows // 5, 2),
        "import_log": max(rows // 100, 10),
    }


def seed_database(old: Server, new: Server, rows: int) -> None:
    servers = (old, new)
    for server in servers:
        _drop_subscriptions(server)
    for server in servers:
        _drop_database(server)
        _restore_logins(server)
        _create_database(server)
    fill(old, rows)


def _restore_logins(server: Server) -> None:
    """A cutover's fence leaves the application role without LOGIN on the old node: every seed starts anew."""
    connection = server.connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(OWNER)))
    finally:
        connection.close()


def _database_exists(server: Server) -> bool:
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            return cursor.fetchone() is not None
    finally:
        connection.close()


def _drop_subscriptions(server: Server) -> None:
    """DROP DATABASE refuses while subscriptions live in it; detach them from their slots first."""
    if not _database_exists(server):
        return
    connection = server.connect(dbname=DATABASE)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT subname FROM pg_subscription WHERE subdbid = "
                           "(SELECT oid FROM pg_database WHERE datname = current_database())")
            for (name,) in cursor.fetchall():
                subscription = sql.Identifier(name)
                cursor.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(subscription))
                cursor.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(subscription))
                cursor.execute(sql.SQL("DROP SUBSCRIPTION {}").format(subscription))
    finally:
        connection.close()


def _drop_database(server: Server) -> None:
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            deadline = time.monotonic() + 10
            while True:
                cursor.execute("SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (DATABASE,))
                slots = cursor.fetchall()
                if not slots:
                    break
                for slot_name, active_pid in slots:
                    if active_pid:
                        cursor.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
                    else:
                        cursor.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not drop replication slots of {DATABASE} on {server.name}: {slots}")
                time.sleep(0.05)
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
    finally:
        connection.close()


def _create_database(server: Server) -> None:
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(OWNER)))
    finally:
        connection.close()


def fill(server: Server, rows: int, database: str = DATABASE, owner: str = OWNER) -> None:
    """The demo schema and rows in `database`, created as `owner` (the bench's fleet fills one per source)."""
    connection = server.connect(dbname=database, autocommit=False)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
            cursor.execute(SCHEMA_DDL)
            cursor.execute(FILL_SQL, row_counts(rows))
            cursor.execute(GRANTS_SQL)
            cursor.execute("RESET ROLE")
        connection.commit()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    finally:
        connection.close()
