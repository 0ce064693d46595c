"""One replication suite, two drivers: `driver_name` runs each test with native and with pgactive."""

from __future__ import annotations

import threading

import pytest

from pgactive_upgrade import catalog
from pgactive_upgrade.db import Credentials, Endpoint, connected
from pgactive_upgrade.replication import Link, Node, driver_for
from replication_helpers import FILTERS
from topology.postgres import HOST

DATABASE = "app"
SOURCE_ID, TARGET_ID = "orders-db", "orders-db-pg17"


def pgactive_missing(topology) -> str | None:
    """Why the pgactive cases cannot run here, or None when both servers offer the extension."""
    missing = []
    for server in (topology.old_pg, topology.new_pg):
        with server.connect() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgactive'")
            if cursor.fetchone() is None:
                missing.append(f"{server.name} PostgreSQL {server.major} ({server.bin_dir})")
        connection.close()
    if missing:
        return ("pgactive is not in pg_available_extensions on " + ", ".join(missing) +
                "; build aws/pgactive and point PGU_OLD_PG_BIN / PGU_NEW_PG_BIN at the pgactive-enabled bin dirs")
    return None


@pytest.fixture(params=["native", "pgactive"])
def driver_name(request, topology):
    if request.param == "pgactive":
        reason = pgactive_missing(topology)
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def pgactive_only(driver_name):
    if driver_name != "pgactive":
        pytest.skip("active-active behaviour: the native driver replicates one way until cutover")


def endpoint(server) -> Endpoint:
    return Endpoint(HOST, server.port, DATABASE)


def make_link(topology) -> Link:
    source, target = endpoint(topology.old_pg), endpoint(topology.new_pg)
    admin = Credentials("postgres", topology.credentials["postgres"])
    with connected(source, admin) as connection:
        tables = catalog.tables(connection, FILTERS)
    return Link(
        source=Node(SOURCE_ID, source, source),
        target=Node(TARGET_ID, target, target),
        admin=admin,
        replication=Credentials("replicator", topology.credentials["replicator"]),
        tables=tuple(tables),
        filters=FILTERS,
    )


@pytest.fixture
def link(fresh_databases):
    return make_link(fresh_databases)


@pytest.fixture
def driver(driver_name, link, topology, monkeypatch):
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topology.new_pg.bin_dir))  # the schema copy needs pg_dump 17
    driver = driver_for(driver_name, link)
    if driver_name == "pgactive":
        driver.poll_seconds = 0.5
        driver.ready_timeout_seconds = 120
    yield driver
    if driver_name == "pgactive":
        remove_pgactive_everywhere(driver)


def remove_pgactive_everywhere(driver) -> None:
    """Leave no pgactive node behind (the next test drops and reseeds the databases); both nodes at once."""
    removers = [threading.Thread(target=_remove_quietly, args=(driver, node)) for node in (driver.link.target, driver.link.source)]
    for remover in removers:
        remover.start()
    for remover in removers:
        remover.join()


def _remove_quietly(driver, node) -> None:
    try:
        with driver._connect(node) as connection:
            # The pause flag lives in shared memory: a test that failed while paused must not stall the next one.
            connection.cursor().execute("SELECT pgactive.pgactive_apply_resume() FROM pg_extension WHERE extname = 'pgactive'")
    except Exception:
        pass
    try:
        driver._remove_from(node)
    except Exception:
        pass
