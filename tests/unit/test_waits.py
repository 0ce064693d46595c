"""Every place the package sleeps, read from the code: long waits belong in the triggerer (deferred), so a task
only sleeps in short, bounded loops. A new sleep fails this test until it is listed here with its bound."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "include" / "pgactive_upgrade"

# function -> how long it can sleep in a task, and why it is not deferred
BOUNDED = {
    "cutover.FencedSwitch._wait_for_marker": "inside the fence, bounded by cutover_deadline_seconds",
    "switch_state.locked": "the upgrade's lock: a live cutover or rollback holds it at most its deadline + 30 s",
    "fencing.end_sessions": "5 s: the fenced roles' sessions ending",
    "verify.Verification.barrier": "a replication barrier: the lag (at most 120 s) of a node verify reads",
    "verify.Verification._confirm": "0.05-0.15 s between re-checks of a row",
    "replication.native.NativeDriver._drop_unread_reverse_slot": "5 s: a dead actor's slot creator ending",
    "replication.pgactive.PgactiveDriver._join_dead": "a few polls of the per-db worker",
    "replication.pgactive.PgactiveDriver._wait_without_perdb_worker": "30 s: pgactive's worker stopping",
    "replication.base.ReplicationDriver.flow_problem": "15 s per publishing node, only when a health check found new "
                                                       "apply errors with lag under the threshold: a marker row arrives",
    # build(wait=True) only (tests and benches): build_replication waits for the join deferred (JoinTrigger).
    "replication.pgactive.PgactiveDriver._wait_for_status": "the join, when a caller asks build() to wait",
}
TRIGGERS = "airflow.triggers"  # triggers wait by design (asyncio.sleep in the triggerer)


def sleeping_functions() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found |= {f"{module}.{name}" for name in _sleepers(ast.parse(path.read_text()))}
    return found


def _sleepers(tree: ast.AST, prefix: str = "") -> set[str]:
    names = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            names |= _sleepers(node, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(_is_sleep(c) for c in ast.walk(node)):
            names.add(prefix + node.name)
    return names


def _is_sleep(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name) and node.func.value.id in ("time", "asyncio"))


def test_tasks_sleep_only_in_listed_short_waits():
    in_tasks = {name for name in sleeping_functions() if not name.startswith(TRIGGERS)}
    assert in_tasks == set(BOUNDED), "a wait longer than a few seconds should defer to a trigger"


def test_rds_steps_and_the_settle_time_do_not_sleep():
    sleepers = sleeping_functions()
    assert not [name for name in sleepers if name.startswith(("rds.", "upgrade.", "airflow.operators."))]
    assert "airflow.triggers.SettleTrigger.run" in sleepers
