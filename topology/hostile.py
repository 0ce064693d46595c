"""A hostile schema: one of each object logical replication cannot carry (or carries only with help), added to the
seeded demo database on the old server. `Hostile(topology)` is a context manager: it holds an open transaction
and a prepared one while entered, and removes what outlives the database (roles, slots, prepared transactions)."""
from __future__ import annotations

from topology import seed

SCHEMA_SQL = """
CREATE SCHEMA hostile;
CREATE TABLE hostile.no_pk (id int, note text);
CREATE UNLOGGED TABLE hostile.unlogged_events (id int PRIMARY KEY);
CREATE TABLE hostile.nothing_identity (id int PRIMARY KEY);
ALTER TABLE hostile.nothing_identity REPLICA IDENTITY NOTHING;
CREATE TABLE hostile.full_identity (id int PRIMARY KEY, payload text);
ALTER TABLE hostile.full_identity REPLICA IDENTITY FULL;
CREATE TABLE hostile.index_identity (id int PRIMARY KEY, code text NOT NULL UNIQUE);
ALTER TABLE hostile.index_identity REPLICA IDENTITY USING INDEX index_identity_code_key;

CREATE MATERIALIZED VIEW hostile.order_totals AS SELECT account_id, sum(amount) AS total FROM public.orders GROUP BY 1;

CREATE TABLE hostile.readings (id int, taken date, PRIMARY KEY (id, taken)) PARTITION BY RANGE (taken);
CREATE TABLE hostile.readings_2024 PARTITION OF hostile.readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE hostile.readings_2025 PARTITION OF hostile.readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE hostile.visits (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE hostile.visits_2024 PARTITION OF hostile.visits FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE scratch.visits_2025 PARTITION OF hostile.visits FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');

CREATE SEQUENCE scratch.loose_counter;
CREATE SEQUENCE scratch.ticket_numbers;
CREATE TABLE hostile.tickets (id bigint PRIMARY KEY DEFAULT nextval('scratch.ticket_numbers'));
CREATE SEQUENCE hostile.countdown INCREMENT BY -1;
CREATE SEQUENCE hostile.nearly_full AS integer;
SELECT setval('hostile.nearly_full', 2100000000);

SELECT lo_from_bytea(0, 'a large object');
CREATE EXTENSION adminpack;

CREATE COLLATION hostile.german (provider = icu, locale = 'de-DE');
UPDATE pg_collation SET collversion = '1.0' WHERE oid = 'hostile.german'::regcollation;
CREATE TABLE hostile.names (id int PRIMARY KEY, name text COLLATE hostile.german);
CREATE INDEX names_by_name ON hostile.names (name);

CREATE PUBLICATION hostile_pub FOR TABLE hostile.full_identity;
CREATE SUBSCRIPTION hostile_sub CONNECTION 'host=127.0.0.1 port=1 dbname=elsewhere' PUBLICATION elsewhere
    WITH (connect = false);
CREATE ROLE hostile_app LOGIN;
"""
OTHER_CONSUMER_SLOT = "hostile_cdc"
STANDBY_SLOTS = 17  # with the other consumer's slot: 18 of 20 slots in use, fewer than the native driver needs
ROLE = "hostile_app"
PREPARED = "hostile_prepared"


class Hostile:
    def __init__(self, topology):
        self.server = topology.old_pg
        self._open: list = []

    def __enter__(self) -> Hostile:
        self._run(SCHEMA_SQL)
        self._spill_decoding()
        self._run(" ".join(f"SELECT pg_create_physical_replication_slot('hostile_standby_{n}');"
                           for n in range(STANDBY_SLOTS)))
        self._hold_open_transaction()
        self._prepare_transaction()
        return self

    def __exit__(self, *exc) -> None:
        for connection in self._open:
            connection.close()
        self._run(f"ROLLBACK PREPARED '{PREPARED}'")
        self._run("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                  "WHERE slot_name LIKE 'hostile\\_%'", dbname="postgres")
        self._run(f"DROP ROLE IF EXISTS {ROLE}", dbname="postgres")

    def _run(self, statement: str, dbname: str = seed.DATABASE) -> None:
        connection = self.server.connect(dbname=dbname)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def _spill_decoding(self) -> None:
        """Another consumer's slot decodes a transaction bigger than logical_decoding_work_mem: it spills."""
        self._run(f"SELECT pg_create_logical_replication_slot('{OTHER_CONSUMER_SLOT}', 'test_decoding')")
        self._run("INSERT INTO hostile.full_identity SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
        self._run("SET logical_decoding_work_mem = '64kB'; "
                  f"SELECT count(*) FROM pg_logical_slot_get_changes('{OTHER_CONSUMER_SLOT}', NULL, NULL)")

    def _hold_open_transaction(self) -> None:
        connection = self.server.connect(user="app", dbname=seed.DATABASE, autocommit=False)
        with connection.cursor() as cursor:
            cursor.execute("SELECT txid_current()")  # a transaction with an xid: slot creation waits for it
        self._open.append(connection)

    def _prepare_transaction(self) -> None:
        self._run(f"BEGIN; INSERT INTO hostile.tickets DEFAULT VALUES; PREPARE TRANSACTION '{PREPARED}'")
