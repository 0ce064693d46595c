"""Event lines stay under 500 bytes and never use a field name Airflow's task supervisor chokes on."""

import json

import pytest

from pgactive_upgrade import events


def test_an_oversized_event_is_shortened_under_the_limit():
    fields = events.emit("phase_failed", problems=["x" * 400, "y" * 400], restored={"pg_write": 0, "pg_read": 20})
    assert len(json.dumps({"event": "phase_failed", **fields})) < events.MAX_EVENT_BYTES


def test_small_events_are_logged_unchanged():
    fields = events.emit("in_sync", lag_bytes=12, detail={"direction": "forward"})
    assert fields == {"lag_bytes": 12, "detail": {"direction": "forward"}}


@pytest.mark.parametrize("reserved", sorted(events.RESERVED_FIELDS))
def test_reserved_field_names_are_renamed(reserved):
    fields = events.emit("x", **{reserved: "value"})
    assert reserved not in fields and fields[f"{reserved}_"] == "value"


def test_values_that_are_not_json_become_text():
    assert events.emit("x", when=object)["when"].startswith("<class")
