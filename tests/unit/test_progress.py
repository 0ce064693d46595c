"""The progress record's error line and the health report's sorting, as plain Python."""

from __future__ import annotations

from pgactive_upgrade import progress
from pgactive_upgrade.health import HealthReport
from pgactive_upgrade.replication.base import Lag


def test_the_error_line_is_the_first_line_named_by_type_redacted_and_short():
    error = RuntimeError("verification failed: public.orders rows 1-500 differ\nTraceback noise\nmore")
    assert progress.error_line(error) == "RuntimeError: verification failed: public.orders rows 1-500 differ"
    assert progress.error_line(ValueError("password=hunter2 refused"), redact=lambda t: t.replace("hunter2", "***")) \
        == "ValueError: password=*** refused"
    assert len(progress.error_line(RuntimeError("x" * 2000))) == progress.ERROR_LINE_CHARS
    assert progress.error_line(TimeoutError()) == "TimeoutError"
    assert progress.error_line(None) is None


def test_a_record_says_awaiting_input_while_a_gate_asks_else_running():
    common = {"dag_id": "d", "run_id": "r", "conf": {}, "step": "approve_cutover"}
    assert progress.progress_record(**common, state=progress.AWAITING_INPUT)["run_state"] == "awaiting_input"
    assert progress.progress_record(**common, state="done")["run_state"] == "running"


def test_the_health_report_sorts_what_fails_a_phase_from_what_an_operator_decides():
    high = HealthReport(lag=Lag(2048, True, {}), threshold_bytes=1024, lag_causes=["pid 7 open"])
    assert high.lag_high and not high.healthy and high.problems == []
    problems, lag = high  # what health_check returned before the report
    assert problems == ["replication lag 2048 bytes above the threshold 1024", "pid 7 open"] and lag.bytes == 2048
    low = HealthReport(lag=Lag(10, True, {}), threshold_bytes=1024, conflicts=["orders-db: conflict_id 3 ..."])
    assert not low.lag_high and not low.healthy and list(low)[0] == ["orders-db: conflict_id 3 ..."]
    assert HealthReport(lag=Lag(None, False, {}), threshold_bytes=1024).lag_high is False
