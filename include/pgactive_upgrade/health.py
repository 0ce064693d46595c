"""After a phase: the target answers, and each probe query succeeds, within the latency budget."""

from __future__ import annotations

import math
import time

from pgactive_upgrade.db import Credentials, Endpoint, connect, query


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
        named: list[tuple[str, str, float | None]] = [("connect+SELECT 1", "SELECT 1", started)]
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
