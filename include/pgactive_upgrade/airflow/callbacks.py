"""Airflow callbacks that keep the progress record true when a task or the run ends badly.

A step records `running`/`done` itself; only Airflow knows when it failed (an exception, a timeout, a process that
died), when the run ended, and whether a rollback halted it. Task callbacks run in the task's process; DAG callbacks
run in the dag-processor. Neither may break the run: each logs and gives up on an error.
"""

from __future__ import annotations

from typing import Any

from pgactive_upgrade import config, progress
from pgactive_upgrade.airflow import state
from pgactive_upgrade.events import emit


def record_task_failure(context) -> None:
    """on_failure_callback of each upgrade task: the step is `failed` (or `halted` when a rollback stopped the run),
    with the error's first line."""
    ti = context.get("ti") or context.get("task_instance")
    # Without an exception the callback comes from the dag-processor: the task's process died or stopped heartbeating.
    error = context.get("exception") or "the task failed without an error of its own (its process died or stopped " \
                                        "heartbeating); its log has the rest"
    _record(context, step=getattr(ti, "task_id", None), map_index=getattr(ti, "map_index", -1), error=error,
            run_failed=False)


def record_run_success(context) -> None:
    """on_success_callback of the upgrade DAG."""
    source, run_id = _run_of(context)
    if source and run_id and state.merge_if_run(source, run_id, {"run_state": progress.SUCCESS, "error": None}):
        emit("upgrade_succeeded", run_id=run_id)


def record_run_failure(context) -> None:
    """on_failure_callback of the upgrade DAG: the run failed (or was halted), even when no task said so
    (a run marked failed, a task that never started)."""
    _record(context, step=None, map_index=-1, error=None, run_failed=True)


def _record(context, *, step: str | None, map_index: int, error: Any, run_failed: bool) -> None:
    try:
        source, run_id = _run_of(context)
        if not source or not run_id:
            return
        halt = state.read(progress.halt_key(source))
        halted = bool(halt and halt.get("run_id") == run_id) or isinstance(error, progress.HaltedError)
        fields: dict[str, Any] = {"run_state": progress.HALTED if halted else progress.FAILED}
        if halted and halt:
            fields["halted_by"] = {k: halt.get(k) for k in ("requested_by", "triggered_by", "reason", "rollback_run_id", "at")}
        if step:
            fields.update(step=step, state=progress.HALTED if halted else progress.FAILED, failed_task=_task_key(step, map_index),
                          error=progress.error_line(error, _redact))
        elif run_failed and not halted:
            record = state.read(progress.record_key(source)) or {}
            fields["error"] = record.get("error") or progress.error_line(context.get("reason") or "the run failed", _redact)
        if state.merge_if_run(source, run_id, fields):
            emit("progress_recorded", run_state=fields["run_state"], step=step, error=fields.get("error"))
    except Exception as failure:  # a callback must not hide the task's own error
        emit("progress_record_failed", error=type(failure).__name__)


def _run_of(context) -> tuple[str | None, str | None]:
    dag_run = context.get("dag_run")
    if dag_run is None:
        return None, context.get("run_id")
    try:
        source = config.validate(dict(dag_run.conf or {})).source_identifier
    except config.RequestError:  # a run refused for its conf recorded nothing
        return None, dag_run.run_id
    return source, dag_run.run_id


def _task_key(task_id: str, map_index: int | None) -> str:
    return task_id if map_index in (None, -1) else f"{task_id}[{map_index}]"


def _redact(text: str) -> str:
    try:
        from airflow.sdk._shared.secrets_masker import redact
    except ImportError:  # pragma: no cover - other Airflow layouts
        return text
    return str(redact(text))
