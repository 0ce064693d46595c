"""The durable state of a traffic switch (a cutover, or a rollback after cutover), and the lock its actor holds.

The state is one row per upgrade in the package's schema, written on the source (the authority) and mirrored on
the target before each act that cannot be taken back. The actor holds a session advisory lock on the source for
as long as it acts: the server releases it the moment the actor's process dies, so whoever takes the lock next
(the same task cleared, the watchdog, the rollback DAG, a later run) knows that nobody else is acting, reads the
row and finishes the switch in the safe direction: before `switching` was recorded, undo; from then on, forward.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Iterator

from psycopg2 import sql

from pgactive_upgrade.catalog import META_SCHEMA
from pgactive_upgrade.db import execute, qualified, query

STATE_TABLE = "switch_state"
LOCK_CLASS = 74_210_001  # first key of the two-key advisory lock; the second is the hash of the upgrade's key

CUTOVER, ROLLBACK, DETACH = "cutover", "rollback", "detach"
# In order; `switching` is the point of no return (recorded just before the switch is sent).
PHASES = ("fencing", "fenced", "caught_up", "sequences", "reverse_prepared", "switching", "switched", "done")
UNDONE = "undone"
SWITCHING = "switching"


class LockBusy(RuntimeError):
    """Another live process acts on this upgrade's traffic or replication."""


@dataclass
class SwitchState:
    direction: str
    phase: str
    token: str
    previous_split: dict = field(default_factory=dict)
    holder: str = ""
    updated_at: str = ""

    @property
    def settled(self) -> bool:
        return self.phase in ("done", UNDONE)

    @property
    def past_no_return(self) -> bool:
        return self.phase in PHASES and PHASES.index(self.phase) >= PHASES.index(SWITCHING)

    @property
    def writer(self) -> str:
        """The node that takes application writes once this switch is settled: 'source' or 'target'."""
        if self.direction == DETACH:
            return "target"
        ends_on_target = self.direction == CUTOVER
        finished = self.phase == "done" or self.past_no_return
        return ("target" if ends_on_target else "source") if finished else ("source" if ends_on_target else "target")

    def as_dict(self) -> dict:
        return {"direction": self.direction, "phase": self.phase, "token": self.token,
                "previous_split": self.previous_split, "holder": self.holder, "updated_at": self.updated_at}


def holder_name() -> str:
    """Who acts: host and process id (the fault-injection tests and an operator find the process by it)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_table(connection) -> None:
    execute(connection, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(META_SCHEMA)))
    execute(connection, sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, direction text NOT NULL, phase text NOT NULL, "
        "token text NOT NULL, previous_split jsonb NOT NULL DEFAULT '{{}}', holder text NOT NULL DEFAULT '', "
        "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ).format(qualified(META_SCHEMA, STATE_TABLE)))


def read(connection, key: str) -> SwitchState | None:
    if not query(connection, "SELECT to_regclass(%s)", (f"{META_SCHEMA}.{STATE_TABLE}",))[0][0]:
        return None
    rows = query(connection, sql.SQL(
        "SELECT direction, phase, token, previous_split, holder, updated_at::text FROM {} WHERE key = %s"
    ).format(qualified(META_SCHEMA, STATE_TABLE)), (key,))
    return SwitchState(*rows[0]) if rows else None


def write(connection, key: str, state: SwitchState, durable: bool = True) -> None:
    """durable=False skips the WAL flush (synchronous_commit off for this one transaction, still one round trip):
    for a phase whose loss in a server crash changes nothing, because recovery from the phase before it takes the
    same way out. A later durable write flushes it anyway."""
    state.holder = state.holder or holder_name()
    if not durable:  # one query string is one implicit transaction: on an error the session is idle again
        execute(connection, sql.SQL("SET LOCAL synchronous_commit TO off; {}").format(_upsert()), _row(key, state))
        return
    execute(connection, _upsert(), _row(key, state))


def _upsert() -> sql.Composed:
    return sql.SQL(
        "INSERT INTO {} AS s (key, direction, phase, token, previous_split, holder) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (key) DO UPDATE SET direction = excluded.direction, phase = excluded.phase, token = excluded.token, "
        "previous_split = excluded.previous_split, holder = excluded.holder, updated_at = clock_timestamp()"
    ).format(qualified(META_SCHEMA, STATE_TABLE))


def _row(key: str, state: SwitchState) -> tuple:
    return key, state.direction, state.phase, state.token, json.dumps(state.previous_split), state.holder


def confirm(connection, key: str, state: SwitchState) -> None:
    """Through the connection that holds the lock: this actor still holds it and the row still says `state.phase`.
    Called before undoing, so an actor that lost its connection (and so its lock) never undoes what a later one
    may be rolling forward."""
    rows = query(connection, sql.SQL("UPDATE {} SET holder = %s WHERE key = %s AND phase = %s RETURNING 1").format(
        qualified(META_SCHEMA, STATE_TABLE)), (holder_name(), key, state.phase))
    if not rows:
        raise LockBusy(f"the switch state of {key} is no longer {state.phase!r}: another actor took over")


def _lock_args(key: str) -> tuple[int, str]:
    return LOCK_CLASS, f"pgactive_upgrade:{key}"


@contextmanager
def locked(connection, key: str, wait_seconds: float, poll_seconds: float = 0.02) -> Iterator[None]:
    """Hold the upgrade's lock on this connection's server; LockBusy when a live holder keeps it past the wait."""
    deadline = time.monotonic() + wait_seconds
    while not query(connection, "SELECT pg_try_advisory_lock(%s, hashtext(%s))", _lock_args(key))[0][0]:
        if time.monotonic() > deadline:
            raise LockBusy(f"another process has held the lock of {key} for over {wait_seconds:.0f} s: {lock_holder(connection, key)}")
        time.sleep(poll_seconds)
    try:
        yield
    finally:
        try:
            query(connection, "SELECT pg_advisory_unlock(%s, hashtext(%s))", _lock_args(key))
        except Exception:  # a dead connection already released it; the error that brought us here matters more
            pass


def lock_holder(connection, key: str) -> str | None:
    """The session holding the upgrade's lock ('pid N (application)'), or None when it is free."""
    rows = query(
        connection,
        "SELECT 'pid ' || a.pid || ' (' || coalesce(a.application_name, '') || ')' FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = %s::int::oid AND l.objid = hashtext(%s)::oid AND l.objsubid = 2",
        _lock_args(key),
    )
    return rows[0][0] if rows else None
