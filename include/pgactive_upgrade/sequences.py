"""Sequences are not replicated: move the target's forward to (at least) the source's values."""

from __future__ import annotations

from pgactive_upgrade.catalog import Sequence
from pgactive_upgrade.db import qualified, query
from psycopg2 import sql

_SETVAL = "SELECT setval(format('%%I.%%I', %s, %s)::regclass, %s, true)"


def current_value(connection, sequence: Sequence) -> int | None:
    """The last value handed out, or None when nextval was never called."""
    statement = sql.SQL("SELECT last_value, is_called FROM {}").format(qualified(sequence.schema, sequence.name))
    last_value, is_called = query(connection, statement)[0]
    return last_value if is_called else None


def move_forward(source, target, sequences: list[Sequence], margin: int = 0) -> dict[str, int]:
    """Set each target sequence to the source's value plus margin, never moving one backwards.

    Returns the sequences that changed with their new values.
    """
    moved = {}
    for sequence in sequences:
        wanted = current_value(source, sequence)
        if wanted is None:
            continue
        wanted += margin
        have = current_value(target, sequence)
        if have is None or have < wanted:
            query(target, _SETVAL, (sequence.schema, sequence.name, wanted))
            moved[sequence.qualified_name] = wanted
    return moved


def differences(source, target, sequences: list[Sequence]) -> dict[str, tuple]:
    """Sequences whose target value is behind the source's: name -> (source, target)."""
    behind = {}
    for sequence in sequences:
        on_source, on_target = current_value(source, sequence), current_value(target, sequence)
        if on_source is not None and (on_target is None or on_target < on_source):
            behind[sequence.qualified_name] = (on_source, on_target)
    return behind
