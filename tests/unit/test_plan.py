"""The plan's pure parts: the copy estimate, the routes each phase moves, the summary text."""

from types import SimpleNamespace

from pgactive_upgrade import config, plan
from pgactive_upgrade.upgrade import Upgrade


def request(**overrides):
    return config.validate({"source_instance": "orders-db", "target_engine_version": "17.2", **overrides})


def test_copy_estimate_divides_the_bytes_by_the_measured_rate_and_says_where_the_rate_comes_from():
    estimate = plan.copy_estimate(110_000_001, 3)
    assert estimate["seconds"] == 3 and estimate["tables"] == 3
    assert "local topology" in estimate["rate_source"]
    assert plan.copy_estimate(0, 0)["seconds"] == 0


def controller(*routes):
    return SimpleNamespace(routes=[SimpleNamespace(name=n, carries_writes=w) for n, w in routes])


def phases_of(**overrides):
    upgrade = SimpleNamespace(request=request(**overrides), movable_routes=lambda c, d: Upgrade.movable_routes(None, c, d))
    return plan.phases(upgrade, controller(("pg_write", True), ("pg_read", False), ("reports", False)))


def test_native_phases_move_only_read_routes_and_units_mode_moves_whole_routes():
    assert phases_of(shift_percentages=[10, 50])[0]["routes"] == ["pg_read", "reports"]
    units = phases_of(replication_driver="pgactive", shift_mode="units", shift_percentages=[34, 100])
    assert [p["routes"] for p in units] == [["pg_write", "pg_read"], ["pg_write", "pg_read", "reports"]]


def test_the_summary_names_blocking_problems_first_and_every_section():
    made = {
        "source": {"identifier": "orders-db", "engine_version": "15.8"},
        "target": {"identifier": "orders-db-pg17", "engine_version": "17.2"}, "driver": "native",
        "preflight": {"blocking": ["allow_source_reboot: the source needs a reboot"], "warnings": []},
        "resources": [{"kind": "DB instance", "name": "orders-db-pg17", "action": "create", "detail": "17.2"}],
        "reboots": [{"role": "source", "instance": "orders-db", "why": "to apply its group"}],
        "steps": plan.steps(request(), "pgu_orders_db"),
        "copy_estimate": plan.copy_estimate(55_000_000, 2), "phases": phases_of(shift_percentages=[50]),
        "cutover": {"routes": ["pg_write", "pg_read"], "fence_roles": ["app"], "sessions_ended_now": ["app pid 7"],
                    "deadline_seconds": 60},
        "decommission": "orders-db kept", "rollback": plan.rollback_path(),
    }
    text = plan.summary(made)
    assert "Preflight: BLOCKS THE RUN: allow_source_reboot" in text
    for part in ("create   DB instance orders-db-pg17", "source orders-db: to apply its group", "subscription pgu_orders_db_fwd",
                 "about 1 s at 55 MB/s", "50 %: pg_read, reports", "fence roles app", "would end: app pid 7",
                 "after detach_old_node / decommission_source: refused"):
        assert part in text, part
