"""Progress and halt records kept in Airflow Variables, readable by the rollback DAG and the plugin."""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import Variable

from pgactive_upgrade import progress
from pgactive_upgrade.airflow import metrics


def read(key: str) -> dict | None:
    raw = Variable.get(key, default=None)
    return json.loads(raw) if raw else None


def write(key: str, value: dict[str, Any]) -> None:
    Variable.set(key, json.dumps(value, default=str))


def merge(key: str, fields: dict[str, Any]) -> dict:
    """Read the record again and write back only these fields: steps that ended meanwhile are kept."""
    record = {**(read(key) or {}), **fields, "updated_at": progress.now()}
    write(key, record)
    return record


KEPT_ACROSS_RUNS = ("cut_over", "detached")  # what happened to the databases outlives the run that did it
KEPT_WITHIN_RUN = ("split", "percent", "phase", "conflict_baseline", "apply_error_baseline", "replication_lag_bytes",
                   "lag_measured_at", "gates",
                   "statistics_progress", "extensions_updated", "lag_history", "write_unavailable_ms")


def record_step(context, source_identifier: str, step: str, state: str, **extra: Any) -> None:
    dag_run = context["dag_run"]
    previous = read(progress.record_key(source_identifier)) or {}
    same_run = previous.get("run_id") == dag_run.run_id
    kept = {k: v for k, v in previous.items() if k in KEPT_ACROSS_RUNS or (same_run and k in KEPT_WITHIN_RUN)}
    record = progress.progress_record(
        dag_id=dag_run.dag_id, run_id=dag_run.run_id, conf=dict(dag_run.conf or {}), step=step, state=state,
        triggered_by=getattr(dag_run, "triggering_user_name", None), **{**kept, **extra},
    )
    write(progress.record_key(source_identifier), record)


def record_lag(source_identifier: str, run_id: str, lag_bytes: int | None) -> dict | None:
    """A lag measurement into the record of this run (its current lag and the history the page charts); nothing
    when the record belongs to another run. Also sent as a metric."""
    key = progress.record_key(source_identifier)
    record = read(key)
    if not record or record.get("run_id") != run_id:
        return None
    record = progress.with_lag(record, lag_bytes)
    write(key, record)
    metrics.lag(source_identifier, lag_bytes)
    return record


def merge_if_run(source_identifier: str, run_id: str, fields: dict[str, Any]) -> dict | None:
    """Merge into the source's record only while it is this run's: a refused second run of the same source must not
    overwrite the first one's record."""
    key = progress.record_key(source_identifier)
    record = read(key)
    if not record or record.get("run_id") != run_id:
        return None
    return merge(key, fields)


def append_gate(source_identifier: str, run_id: str, entry: dict[str, Any]) -> None:
    record = read(progress.record_key(source_identifier)) or {}
    if record.get("run_id") == run_id:
        merge_if_run(source_identifier, run_id, {"gates": [*(record.get("gates") or []), entry]})


def check_not_halted(context, source_identifier: str) -> None:
    progress.check_not_halted(read(progress.halt_key(source_identifier)), context["dag_run"].run_id)
