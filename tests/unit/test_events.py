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


def test_many_short_fields_are_dropped_until_the_event_fits_and_the_line_says_so():
    fields = events.emit("many", **{f"field_{i}": f"value-{i}" for i in range(60)})
    assert len(json.dumps({"event": "many", **fields}).encode()) <= events.BUDGET_BYTES
    assert fields["fields_dropped"] > 0


def test_multibyte_text_is_counted_in_bytes():
    fields = events.emit("utf8", error="é" * 600)
    assert len(json.dumps({"event": "utf8", **fields}, ensure_ascii=False).encode()) < events.MAX_EVENT_BYTES


@pytest.mark.parametrize("text", ['"' * 2000, "\\" * 2000, "é" * 2000, 'error: "x" \\ ' * 300])
def test_text_full_of_escapes_is_shortened_in_bounded_steps(text):
    fields = events.emit("failed", error=text, tables=[f"public.t{i}" for i in range(300)])
    assert len(json.dumps({"event": "failed", **fields}).encode()) <= events.BUDGET_BYTES
