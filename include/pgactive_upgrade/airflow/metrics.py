"""The upgrade's metrics, sent through Airflow's own metrics layer (StatsD or OpenTelemetry, as [metrics] says).

Each name carries the source instance (plain StatsD has no tags) and the same value as the tag `source`
(OpenTelemetry attributes, DogStatsD or InfluxDB-style tags). With the default prefix a name reads
`airflow.pgactive_upgrade.lag_bytes.orders-db`. A metric never fails a step: a failure is logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)
PREFIX = "pgactive_upgrade"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_stats = None


def lag(source: str, lag_bytes: int | None) -> None:
    if lag_bytes is not None:
        _gauge(f"lag_bytes.{_part(source)}", lag_bytes, source)


def phase(source: str, percent: int, split: Mapping[str, int] | None) -> None:
    """A phase moved traffic: its percent, and each route's share sent to the target."""
    _gauge(f"phase_percent.{_part(source)}", percent, source)
    for route, to_target in (split or {}).items():
        _gauge(f"split.{_part(source)}.{_part(route)}", to_target, source, route=route)


def cutover(source: str, write_unavailable_ms: float | None, split: Mapping[str, int] | None) -> None:
    if write_unavailable_ms is not None:
        _timing(f"cutover.write_unavailable_ms.{_part(source)}", write_unavailable_ms, source)
    phase(source, 100, split)


def rollback(source: str, duration_ms: float, split: Mapping[str, int] | None) -> None:
    _timing(f"rollback.duration_ms.{_part(source)}", duration_ms, source)
    for route, to_target in (split or {}).items():
        _gauge(f"split.{_part(source)}.{_part(route)}", to_target, source, route=route)


def conflicts(source: str, count: int) -> None:
    """New replication conflicts seen by the last health check."""
    _gauge(f"conflicts.{_part(source)}", count, source)


def verify_rate(source: str, step: str, rows_per_second: float) -> None:
    _gauge(f"verify.rows_per_second.{_part(source)}", rows_per_second, source, step=step)


def _part(name: str) -> str:
    """One dot-free segment of a metric name (a route or source name may hold anything StatsD splits on)."""
    return _UNSAFE.sub("_", name)


def _gauge(name: str, value: float, source: str, **tags: str) -> None:
    _send("gauge", f"{PREFIX}.{name}", value, {"source": source, **tags})


def _timing(name: str, milliseconds: float, source: str) -> None:
    _send("timing", f"{PREFIX}.{name}", milliseconds, {"source": source})


def _send(kind: str, name: str, value: float, tags: dict[str, str]) -> None:
    try:
        getattr(_backend(), kind)(name, value, tags=tags)
    except Exception as error:  # observability must never stop an upgrade
        log.warning("metric %s not sent: %s", name, type(error).__name__)


def _backend():
    """The task SDK's metrics layer. A task process has it set up by the task runner; the triggerer sets up only
    Airflow core's copy, so in a trigger it is set up here from the same configuration."""
    global _stats
    if _stats is None:
        from airflow.sdk._shared.observability.metrics import stats
        from airflow.sdk.configuration import conf
        from airflow.sdk.observability.metrics import stats_utils

        if getattr(stats, "_factory", None) is None:
            stats.initialize(factory=stats_utils.get_stats_factory(),
                             export_legacy_names=conf.getboolean("metrics", "legacy_names_on", fallback=True))
        _stats = stats
    return _stats
