"""Which node takes the writes, read from a switch's durable state alone (no database needed)."""

import pytest

from pgactive_upgrade import config
from pgactive_upgrade.switch_state import PHASES, SwitchState


@pytest.mark.parametrize("phase", PHASES[: PHASES.index("switching")] + ("undone",))
def test_a_cutover_before_its_switch_leaves_the_source_writing(phase):
    state = SwitchState("cutover", phase, "t")
    assert state.writer == "source" and state.past_no_return is False


@pytest.mark.parametrize("phase", PHASES[PHASES.index("switching"):])
def test_a_cutover_from_its_switch_on_goes_forward_to_the_target(phase):
    state = SwitchState("cutover", phase, "t")
    assert state.writer == "target" and (state.past_no_return or phase == "done")


@pytest.mark.parametrize("phase,writer", [("fenced", "target"), ("undone", "target"), ("switching", "source"),
                                          ("done", "source")])
def test_a_rollback_after_cutover_mirrors_it(phase, writer):
    assert SwitchState("rollback", phase, "t").writer == writer


def test_settled_only_when_done_or_undone():
    assert [p for p in PHASES + ("undone",) if SwitchState("cutover", p, "t").settled] == ["done", "undone"]


def test_one_source_has_one_key_whatever_its_spelling():
    base = {"target_engine_version": "17.2"}
    spellings = ["Orders-DB", "orders-db", "arn:aws:rds:eu-west-1:123456789012:db:ORDERS-DB"]
    keys = {config.validate({**base, "source_instance": name}).source_identifier for name in spellings}
    assert keys == {"orders-db"}
    assert config.validate_rollback({"source_instance": "ORDERS-db", "reason": "p99 latency regression"}).source_identifier == "orders-db"
