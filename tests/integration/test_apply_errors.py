"""Apply errors seen by a phase's health check, on real servers: while the apply is stuck on the error they fail the
phase; once replication flows again they go to the operator (the report's apply_errors), once: an accepted error is
not named again, a newer one is. The driver is PGU_DRIVER's (native by default; pgactive with the pgactive servers)."""

from __future__ import annotations

from contextlib import closing

import pytest

from pgactive_upgrade.replication.base import ReplicationDriver
from tests.airflow_real.runs import wait_until
from tests.integration.integration_parts import replicating

pytestmark = pytest.mark.integration


@pytest.fixture
def upgrade(build, monkeypatch):
    topo, make = build
    upgrade = make()
    if upgrade.request.replication_driver == "pgactive":
        missing = [s.name for s in (topo.old_pg, topo.new_pg) if not _one(s, "SELECT count(*) FROM pg_available_extensions "
                                                                          "WHERE name = 'pgactive'")[0]]
        if missing:
            pytest.skip(f"pgactive is not available on {missing}: point PGU_OLD_PG_BIN / PGU_NEW_PG_BIN at pgactive builds")
    monkeypatch.setattr(ReplicationDriver, "flow_check_seconds", 5.0)  # a stuck apply is judged in 5 s, not 15
    yield replicating(upgrade, in_sync=True)
    if upgrade.request.replication_driver == "pgactive":
        for node in (upgrade.driver().link.target, upgrade.driver().link.source):
            try:
                upgrade.driver()._remove_from(node)
            except Exception:
                pass


def _one(server, statement, params=None):
    with closing(server.connect(dbname="app")) as connection, connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone() if cursor.description else None


def break_apply(topo, driver: str, n: int) -> tuple:
    """An apply error that repeats until fix_apply: native: the target already holds the email the source then
    inserts (unique violation on the target); pgactive: a column added on the target only, then a row using it (the
    source's apply worker cannot apply it). Returns (server, query) that finds the change once it was applied."""
    if driver == "native":
        _one(topo.new_pg, "INSERT INTO public.accounts (id, email) OVERRIDING SYSTEM VALUE VALUES (%s, %s)",
             (900_000_000 + n, f"clash-{n}@example.com"))
        _one(topo.old_pg, "INSERT INTO public.accounts (email) VALUES (%s)", (f"clash-{n}@example.com",))
        return topo.new_pg, ("SELECT 1 FROM public.accounts WHERE email = %s AND id < 900000000", (f"clash-{n}@example.com",))
    _one(topo.new_pg, f"ALTER TABLE public.orders ADD COLUMN coupon_{n} text")
    _one(topo.new_pg, f"INSERT INTO public.orders (account_id, amount, coupon_{n}) VALUES (1, 5, 'c{n}')")
    return topo.old_pg, (f"SELECT 1 FROM public.orders WHERE coupon_{n} = 'c{n}'", None)


def fix_apply(topo, driver: str, n: int) -> None:
    if driver == "native":
        _one(topo.new_pg, "DELETE FROM public.accounts WHERE id = %s", (900_000_000 + n,))
    else:
        _one(topo.old_pg, f"ALTER TABLE public.orders ADD COLUMN coupon_{n} text")


def _applied(server, check) -> bool:
    try:
        return bool(_one(server, *check))
    except Exception:  # pgactive: the column is not there yet
        return False


def test_an_apply_error_fails_the_phase_while_stuck_then_asks_once_it_flows_and_only_newer_ones_after(upgrade, build):
    topo, _ = build
    driver = upgrade.request.replication_driver
    clean = upgrade.health_check()
    assert clean.problems == [] and clean.apply_errors == [], clean

    server, check = break_apply(topo, driver, 1)
    stuck = wait_until(lambda: (r := upgrade.health_check()) and any(p.startswith("apply error: ") for p in r.problems) and r,
                       60, "the apply error while the apply is stuck")
    assert stuck.apply_errors == [], "a stuck apply is a failed phase, never a question"
    if driver == "native":  # nothing else is wrong: the row written to probe the flow did not arrive
        assert any("is not flowing: a row written on the source did not arrive within 5 s" in p for p in stuck.problems), \
            stuck.problems
    assert not _applied(server, check)

    fix_apply(topo, driver, 1)
    wait_until(lambda: _applied(server, check), 60, "the change applied once the cause is fixed")
    recovered = upgrade.health_check()
    assert recovered.problems == [], recovered.problems
    assert recovered.apply_errors, "an error recorded while replication works now goes to the operator"
    node = "orders-db-pg17" if driver == "native" else "orders-db"
    assert all(line.startswith(f"{node}: ") for line in recovered.apply_errors), recovered.apply_errors
    if driver == "native":
        assert recovered.apply_errors[0].startswith("orders-db-pg17: subscription pgu_orders_db_fwd: ")
        assert "new apply error(s)" in recovered.apply_errors[0] and "server log" in recovered.apply_errors[0]
    else:  # the source's apply worker, from the target; pgactive cleared its last error once it applied again
        assert recovered.apply_errors[0].startswith("orders-db: apply worker (from orders-db-pg17): ")
        assert "failed apply transaction(s)" in recovered.apply_errors[0], recovered.apply_errors
    print(f"\n{driver}: named for the operator: {recovered.apply_errors}; while stuck: {stuck.problems}")
    assert not any("clash-" in line for line in recovered.apply_errors), "no row data in the question"
    assert not recovered.healthy

    accepted = upgrade.health_check(apply_error_baseline=recovered.apply_error_marks)
    assert accepted.apply_errors == [] and accepted.problems == [], "an accepted error is not asked about again"
    assert accepted.healthy

    server, check = break_apply(topo, driver, 2)
    wait_until(lambda: upgrade.health_check(apply_error_baseline=recovered.apply_error_marks).problems, 60, "the newer error")
    fix_apply(topo, driver, 2)
    wait_until(lambda: _applied(server, check), 60, "the second change applied")
    newer = upgrade.health_check(apply_error_baseline=recovered.apply_error_marks)
    assert newer.problems == [] and newer.apply_errors, "a newer error is asked about"
    assert newer.apply_error_marks != recovered.apply_error_marks


def test_an_apply_error_with_lag_above_the_threshold_is_named_among_the_lag_causes(upgrade, build):
    topo, make = build
    driver = upgrade.request.replication_driver
    server, check = break_apply(topo, driver, 3)
    fix_apply(topo, driver, 3)
    wait_until(lambda: _applied(server, check), 60, "the change applied")
    wait_until(lambda: upgrade.health_check().apply_errors, 60, "the recorded error")
    strict = make(lag_threshold_bytes=0)  # every byte of lag counts as high: the lag path, not the question
    if driver == "native":
        _one(topo.new_pg, f"ALTER SUBSCRIPTION {upgrade.key}_fwd DISABLE")
        _one(topo.old_pg, "UPDATE public.orders SET amount = amount")
    else:
        for node in (topo.old_pg, topo.new_pg):
            _one(node, "SELECT pgactive.pgactive_apply_pause()")
        _one(topo.old_pg, "UPDATE public.orders SET amount = amount")
    try:
        report = wait_until(lambda: (r := strict.health_check()) and r.lag_high and r, 60, "lag above the threshold")
    finally:
        if driver == "native":
            _one(topo.new_pg, f"ALTER SUBSCRIPTION {upgrade.key}_fwd ENABLE")
        else:
            for node in (topo.old_pg, topo.new_pg):
                _one(node, "SELECT pgactive.pgactive_apply_resume()")
    assert report.apply_errors == [], report
    assert any(cause.startswith("apply error: ") for cause in report.lag_causes), report.lag_causes
    assert report.apply_error_marks == {}, "errors not judged yet keep the baseline where it was"
