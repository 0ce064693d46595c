"""Where an upgrade records its phase and split, and where a rollback asks it to halt.

The records are small JSON documents (no secrets) kept by the orchestrator (Airflow Variables);
this module only names and shapes them.
"""

from __future__ import annotations

from datetime import datetime, UTC
from typing import Any


class HaltedError(RuntimeError):
    """A rollback asked this upgrade run to stop; nothing more may act."""


def record_key(source_identifier: str) -> str:
    return f"pgactive_upgrade__{source_identifier}"


def halt_key(source_identifier: str) -> str:
    return f"pgactive_upgrade__{source_identifier}__halt"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def progress_record(*, dag_id: str, run_id: str, conf: dict, step: str, state: str, **extra: Any) -> dict:
    return {"dag_id": dag_id, "run_id": run_id, "conf": conf, "step": step, "state": state, "updated_at": now(), **extra}


def halt_record(*, run_id: str, requested_by: str, reason: str, rollback_run_id: str) -> dict:
    return {"run_id": run_id, "requested_by": requested_by, "reason": reason, "rollback_run_id": rollback_run_id, "at": now()}


def check_not_halted(halt: dict | None, run_id: str) -> None:
    if halt and halt.get("run_id") == run_id:
        raise HaltedError(
            f"halted by rollback {halt.get('rollback_run_id')} requested by {halt.get('requested_by')} "
            f"at {halt.get('at')}: {halt.get('reason')}"
        )
