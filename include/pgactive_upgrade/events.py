"""Structured JSON event lines, each under 500 bytes, for the run history and log search."""

from __future__ import annotations

import json
import logging
from typing import Any

import structlog

MAX_EVENT_BYTES = 500
# The event and its fields stay within this; the rest of MAX_EVENT_BYTES is for the level and logger name (the task
# log adds Airflow's own context to each line: timestamp, dag, run and task ids).
BUDGET_BYTES = MAX_EVENT_BYTES - 120
# Airflow 3.3's task supervisor re-logs each field as a keyword argument; a field named like one of
# its own parameters ("target" killed the task process) must be renamed.
RESERVED_FIELDS = frozenset({"target", "level", "msg", "event", "timestamp", "logger"})
_log = structlog.get_logger("pgactive_upgrade")


def emit(event: str, /, *, log_level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
    """Log one event; oversize values are shortened so the JSON line stays under MAX_EVENT_BYTES."""
    fields = {(f"{key}_" if key in RESERVED_FIELDS else key): _jsonable(value) for key, value in fields.items()}
    while _size(event, fields) > BUDGET_BYTES and fields:
        key = max(fields, key=lambda k: len(json.dumps(fields[k])))
        if len(json.dumps(fields[key])) <= 24:  # only short values left: too many fields; the largest go
            fields.pop(key)
            fields["fields_dropped"] = fields.get("fields_dropped", 0) + 1
            continue
        # A text is cut as text (cutting its JSON form would escape the escapes again, growing it back).
        text = fields[key] if isinstance(fields[key], str) else json.dumps(fields[key])
        fields[key] = text[: max(8, len(text) // 2)] + "..."
    _log.log(log_level, event, **fields)
    return fields


def _size(event: str, fields: dict) -> int:
    return len(json.dumps({"event": event, **fields}).encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return str(value)
