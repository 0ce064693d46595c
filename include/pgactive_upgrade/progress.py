"""Where an upgrade records its phase and split, and where a rollback asks it to halt.

The records are small JSON documents (no secrets) kept by the orchestrator (Airflow Variables);
this module only names and shapes them.
"""

from __future__ import annotations

from datetime import datetime, UTC
from typing import Any

RECORD_PREFIX = "pgactive_upgrade__"
HALT_SUFFIX = "__halt"
LAG_HISTORY_POINTS = 240  # the page's lag chart; about 10 KB of record


class HaltedError(RuntimeError):
    """A rollback asked this upgrade run to stop; nothing more may act."""


def record_key(source_identifier: str) -> str:
    return f"{RECORD_PREFIX}{source_identifier}"


def halt_key(source_identifier: str) -> str:
    return f"{RECORD_PREFIX}{source_identifier}{HALT_SUFFIX}"


def source_of_record_key(key: str) -> str | None:
    """The source identifier a Variable key holds the record of; None for a halt flag or another key."""
    if not key.startswith(RECORD_PREFIX) or key.endswith(HALT_SUFFIX):
        return None
    return key[len(RECORD_PREFIX):] or None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# The run as a whole, in the record's `run_state`; `state` is the state of `step`, the last step that reported.
RUNNING, SUCCESS, FAILED, HALTED, AWAITING_INPUT = "running", "success", "failed", "halted", "awaiting_input"
ERROR_LINE_CHARS = 300


def progress_record(*, dag_id: str, run_id: str, conf: dict, step: str, state: str, **extra: Any) -> dict:
    run_state = AWAITING_INPUT if state == AWAITING_INPUT else RUNNING
    return {"dag_id": dag_id, "run_id": run_id, "conf": conf, "step": step, "state": state, "run_state": run_state,
            "updated_at": now(), **extra}


def with_lag(record: dict, lag_bytes: int | None, at: str | None = None) -> dict:
    """The record with this lag measurement as the current lag and appended to its history. The history stays
    bounded (LAG_HISTORY_POINTS): when full, every other point of its older half goes, so a long wait keeps its
    whole span at a coarser grain and the last minutes at full grain."""
    at = at or now()
    history = [*(record.get("lag_history") or []), {"at": at, "bytes": lag_bytes}]
    if len(history) > LAG_HISTORY_POINTS:
        half = len(history) // 2
        history = history[:half:2] + history[half:]
    return {**record, "replication_lag_bytes": lag_bytes, "lag_measured_at": at, "lag_history": history}


def halt_record(*, run_id: str, requested_by: str, reason: str, rollback_run_id: str, triggered_by: str | None = None) -> dict:
    """requested_by: who asked (free text, or a gate's answerer); triggered_by: the authenticated user who triggered
    the rollback run (Airflow's own record of it), when known."""
    return {"run_id": run_id, "requested_by": requested_by, "reason": reason, "rollback_run_id": rollback_run_id,
            "triggered_by": triggered_by, "at": now()}


def error_line(error: BaseException | str | None, redact=lambda text: text) -> str | None:
    """The first line of an error, shortened, passed through `redact` (the orchestrator's secrets masker)."""
    if error is None:
        return None
    text = str(error).strip() or type(error).__name__
    line = str(redact(text.splitlines()[0]))
    if isinstance(error, BaseException) and not line.startswith(type(error).__name__):
        line = f"{type(error).__name__}: {line}"
    return line if len(line) <= ERROR_LINE_CHARS else line[: ERROR_LINE_CHARS - 3] + "..."


def check_not_halted(halt: dict | None, run_id: str) -> None:
    if halt and halt.get("run_id") == run_id:
        raise HaltedError(
            f"halted by rollback {halt.get('rollback_run_id')} requested by {halt.get('requested_by')} "
            f"at {halt.get('at')}: {halt.get('reason')}"
        )
