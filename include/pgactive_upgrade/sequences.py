"""Sequences are not replicated: move the target's forward to (at least) the source's values."""

from __future__ import annotations

from pgactive_upgrade.catalog import Sequence
from pgactive_upgrade.db import qualified, query
from psycopg2 import sql

def current_value(connection, sequence: Sequence) -> int | None:
    """The last value handed out, or None when nextval was never called."""
    return current_values(connection, [sequence])[sequence.qualified_name]


def current_values(connection, sequences: list[Sequence]) -> dict[str, int | None]:
    """Every sequence's last value in one round trip (the cutover reads them inside the write fence)."""
    if not sequences:
        return {}
    statement = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {}, CASE WHEN is_called THEN last_value END FROM {}").format(
            sql.Literal(s.qualified_name), qualified(s.schema, s.name)
        )
        for s in sequences
    )
    return dict(query(connection, statement))


def move_forward(source, target, sequences: list[Sequence], margin: int = 0) -> dict[str, int]:
    """Set each target sequence to the source's value plus margin, never moving one backwards.

    Returns the sequences that changed with their new values.
    """
    on_source, on_target = current_values(source, sequences), current_values(target, sequences)
    moved = {}
    for sequence in sequences:
        wanted = on_source[sequence.qualified_name]
        if wanted is None:
            continue
        wanted += margin
        have = on_target[sequence.qualified_name]
        if have is None or have < wanted:
            moved[sequence] = wanted
    if moved:
        query(target, sql.SQL("SELECT ") + sql.SQL(", ").join(
            sql.SQL("setval(format('%I.%I', {}, {})::regclass, {}, true)").format(
                sql.Literal(s.schema), sql.Literal(s.name), sql.Literal(value)
            )
            for s, value in moved.items()
        ))
    return {s.qualified_name: value for s, value in moved.items()}


def differences(source, target, sequences: list[Sequence]) -> dict[str, tuple]:
    """Sequences whose target value is behind the source's: name -> (source, target)."""
    on_source, on_target = current_values(source, sequences), current_values(target, sequences)
    behind = {}
    for name, value in on_source.items():
        if value is not None and ((target := on_target[name]) is None or target < value):
            behind[name] = (value, target)
    return behind
