"""After a phase: the target answers, and each probe query succeeds, within the latency budget."""

from __future__ import annotations

import math
import time

from dataclasses import dataclass, field
from typing import Any

from pgactive_upgrade.db import Credentials, Endpoint, connect, query


@dataclass
class HealthReport:
    """What a phase's health check found, sorted by what happens next:
    problems: the phase fails and traffic returns to the last healthy split;
    lag_high: lag above the threshold is waited for, then an operator decides (lag_causes name what holds it back);
    conflicts: new replication conflicts, one line per row: an operator decides (accept, or roll back)."""

    lag: Any
    threshold_bytes: int
    problems: list[str] = field(default_factory=list)
    lag_causes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def lag_high(self) -> bool:
        return self.lag.bytes is not None and self.lag.bytes > self.threshold_bytes

    @property
    def healthy(self) -> bool:
        return not (self.problems or self.lag_high or self.conflicts)

    def all_problems(self) -> list[str]:
        lag = [f"replication lag {self.lag.bytes} bytes above the threshold {self.threshold_bytes}"] if self.lag_high else []
        return self.problems + lag + self.lag_causes + self.conflicts

    def __iter__(self):
        """(every problem, lag): what health_check returned before the report sorted them."""
        return iter((self.all_problems(), self.lag))


def probe_problems(endpoint: Endpoint, credentials: Credentials, probes: tuple[str, ...], budget_ms: int) -> list[str]:
    """Connecting plus `SELECT 1`, then each probe in a READ ONLY transaction that is rolled back."""
    started = time.monotonic()
    try:
        connection = connect(endpoint, credentials, connect_timeout=max(2, math.ceil(budget_ms / 1000)))
    except Exception as error:
        return [f"target does not accept connections: {_said(error)}"]
    try:
        query(connection, "SELECT set_config('statement_timeout', %s, false)", (str(budget_ms),))
        connection.set_session(readonly=True, autocommit=False)
        named = [("connect+SELECT 1", "SELECT 1", started)]
        named += [(f"health_probes[{index}]", probe, None) for index, probe in enumerate(probes)]
        problems = []
        for name, statement, since in named:
            try:
                took = _timed(connection, statement, since or time.monotonic())
            except Exception as error:
                problems.append(f"{name} failed: {_said(error)}")
                continue
            finally:
                connection.rollback()
            if took > budget_ms:
                problems.append(f"{name} took {took} ms, over the {budget_ms} ms budget")
        return problems
    finally:
        connection.close()


def _timed(connection, statement: str, started: float) -> float:
    query(connection, statement)
    return round((time.monotonic() - started) * 1000, 1)


def _said(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:200]}"
