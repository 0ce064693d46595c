"""One upgrade's audit trail: who triggered it, who answered each gate, who rolled it back and why, who cleared or
marked which task, in time order.

Built on Airflow's own records, read through its REST API (v2): the DAG runs (the authenticated triggering user),
the audit log (`/eventLogs`: every REST call that changed a run, with its user) and the human-in-the-loop responses
(`/hitlDetails`), plus the package's own: the progress record's gate answers and the rollback's halt record.
`get(path, params)` is any authenticated GET on `/api/v2/` returning the decoded JSON: the caller's permissions apply.
"""

from __future__ import annotations

import json
from datetime import datetime, UTC
from typing import Any
from collections.abc import Callable

from pgactive_upgrade import progress

ROLLBACK_DAG_ID = "pgactive_upgrade_rollback"
# Audit-log events that are a person acting on a run (Airflow also logs reads and its own task state changes).
ACTING_EVENTS = ("trigger_dag_run", "patch_dag_run", "clear_dag_run", "clear_dag_runs", "bulk_dag_runs",
                 "post_clear_task_instances", "patch_task_instance", "patch_task_group_instances",
                 "bulk_task_instances", "delete_task_instance", "update_hitl_detail", "delete_dag_run")
SYSTEM_OWNERS = (None, "", "airflow", "anonymous")
PAGE = 100

Get = Callable[[str, dict | None], dict]


class NoUpgradeRecorded(LookupError):
    pass


def upgrade_audit(get: Get, source_identifier: str) -> dict[str, Any]:
    """The audit trail of the last upgrade recorded for this source (see the module's docstring)."""
    record = _record(get, source_identifier)
    dag_id, run_id = record["dag_id"], record["run_id"]
    run = get(f"dags/{dag_id}/dagRuns/{run_id}", None)
    entries = [_triggered(run, "upgrade")]
    entries += _event_log(get, dag_id, run_id)
    entries += _gate_responses(get, dag_id, run_id)
    entries += [_gate_answer(gate) for gate in record.get("gates") or []]
    rollbacks = _rollback_runs(get, source_identifier, since=run.get("run_after") or "")
    for rollback in rollbacks:
        entries.append(_triggered(rollback, "rollback"))
        entries += _event_log(get, ROLLBACK_DAG_ID, rollback["dag_run_id"])
    halt = record.get("halted_by") or record.get("rollback")
    if halt:
        entries.append(_entry(halt.get("at"), halt.get("requested_by"), "halted by rollback", "package",
                              reason=halt.get("reason"), rollback_run_id=halt.get("rollback_run_id"),
                              triggered_by=halt.get("triggered_by")))
    entries = [e for e in entries if e["at"]]
    entries.sort(key=lambda e: e["at"])
    return {
        "source_instance": source_identifier,
        "upgrade": {"dag_id": dag_id, "run_id": run_id, "triggered_by": run.get("triggering_user_name"),
                    "run_type": run.get("run_type"), "state": run.get("state"), "run_state": record.get("run_state"),
                    "started": run.get("start_date"), "ended": run.get("end_date")},
        "rollbacks": [{"run_id": r["dag_run_id"], "triggered_by": r.get("triggering_user_name"),
                       "run_type": r.get("run_type"), "requested_by": (r.get("conf") or {}).get("requested_by"),
                       "reason": (r.get("conf") or {}).get("reason"), "state": r.get("state")} for r in rollbacks],
        "entries": entries,
    }


def _record(get: Get, source_identifier: str) -> dict:
    try:
        variable = get(f"variables/{progress.record_key(source_identifier)}", None)
    except LookupError as error:
        raise NoUpgradeRecorded(f"no upgrade of {source_identifier!r} is recorded") from error
    return json.loads(variable["value"])


def _triggered(run: dict, what: str) -> dict:
    conf = run.get("conf") or {}
    detail = {"run_id": run.get("dag_run_id"), "run_type": run.get("run_type"), "state": run.get("state")}
    if what == "rollback":
        detail.update(requested_by=conf.get("requested_by"), reason=conf.get("reason"))
    return _entry(run.get("queued_at") or run.get("run_after"), run.get("triggering_user_name"), f"{what} triggered",
                  "dag_run", **detail)


def _event_log(get: Get, dag_id: str, run_id: str) -> list[dict]:
    entries = []
    for log in _paged(get, "eventLogs", "event_logs", {"dag_id": dag_id, "run_id": run_id, "order_by": "when"}):
        if log.get("event") not in ACTING_EVENTS or log.get("owner") in SYSTEM_OWNERS:
            continue
        request = _request_of(log.get("extra"))
        entries.append(_entry(log.get("when"), log.get("owner"), log["event"], "event_log", task_id=log.get("task_id"),
                              map_index=_map_index(log, request), request=request))
    return entries


def _map_index(log: dict, request: Any) -> int | None:
    """The audit log keeps a mapped task's index only in the request's path parameters."""
    if log.get("map_index") is not None:
        return log["map_index"]
    try:
        return int(request["map_index"]) if isinstance(request, dict) and "map_index" in request else None
    except (TypeError, ValueError):
        return None


def _request_of(extra: str | None) -> Any:
    """The request body Airflow logged (it masks secrets itself), without the noise."""
    try:
        fields = json.loads(extra or "{}")
    except ValueError:
        return extra
    if not isinstance(fields, dict):
        return fields
    return {k: v for k, v in fields.items() if k not in ("method", "dag_id", "dag_run_id", "run_id", "task_id")}


def _gate_responses(get: Get, dag_id: str, run_id: str) -> list[dict]:
    entries = []
    for detail in get(f"dags/{dag_id}/dagRuns/{run_id}/hitlDetails", None).get("hitl_details", []):
        ti = detail.get("task_instance") or {}
        who = (detail.get("responded_by_user") or {}).get("name")
        if detail.get("responded_at") is None:
            entries.append(_entry(detail.get("created_at"), None, "gate waiting", "hitl", task_id=ti.get("task_id"),
                                  map_index=ti.get("map_index"), subject=detail.get("subject"),
                                  options=detail.get("options")))
            continue
        entries.append(_entry(detail["responded_at"], who or "timeout (default answer)", "gate answered", "hitl",
                              task_id=ti.get("task_id"), map_index=ti.get("map_index"), subject=detail.get("subject"),
                              chosen=detail.get("chosen_options")))
    return entries


def _gate_answer(gate: dict) -> dict:
    return _entry(gate.get("at"), gate.get("by"), "gate decision applied", "package", task=gate.get("task"),
                  kind=gate.get("kind"), answer=gate.get("answer"), timed_out=gate.get("timed_out"))


def _rollback_runs(get: Get, source_identifier: str, since: str) -> list[dict]:
    runs = _paged(get, f"dags/{ROLLBACK_DAG_ID}/dagRuns", "dag_runs", {"order_by": "run_after"})
    return [run for run in runs if (run.get("run_after") or "") >= since
            and _source_of(run.get("conf") or {}) == source_identifier]


def _source_of(conf: dict) -> str:
    return str(conf.get("source_instance", "")).rsplit(":", 1)[-1].lower()


def _paged(get: Get, path: str, key: str, params: dict) -> list[dict]:
    items, offset = [], 0
    while True:
        page = get(path, {**params, "limit": PAGE, "offset": offset}).get(key, [])
        items += page
        if len(page) < PAGE:
            return items
        offset += PAGE


def _entry(at: Any, who: Any, what: str, origin: str, **detail: Any) -> dict:
    return {"at": _utc(at), "who": who, "what": what, "origin": origin,
            **{k: v for k, v in detail.items() if v is not None}}


def _utc(at: Any) -> str | None:
    """One timestamp format (Airflow's API and the package's records differ), so entries sort by time."""
    if not at:
        return None
    try:
        moment = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
    except ValueError:
        return str(at)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
