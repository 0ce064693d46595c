"""The progress record's lag history, the upgrades page's HTML, and the endpoint's shared reads."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta, UTC

from pgactive_upgrade import progress
from pgactive_upgrade.airflow import progress_page


def test_lag_history_keeps_every_measurement_then_stays_bounded_over_the_whole_span():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    record = {"run_id": "r"}
    for second in range(1000):
        record = progress.with_lag(record, second * 10, at=(start + timedelta(seconds=second)).isoformat())
        if second == 99:
            assert len(record["lag_history"]) == 100, "a short run keeps every point"
    history = record["lag_history"]
    assert len(history) <= progress.LAG_HISTORY_POINTS
    assert history[0]["bytes"] == 0, "the start of the wait is kept"
    assert history[-1] == {"at": (start + timedelta(seconds=999)).isoformat(), "bytes": 9990}
    assert record["replication_lag_bytes"] == 9990 and record["lag_measured_at"] == history[-1]["at"]
    assert [p["at"] for p in history] == sorted(p["at"] for p in history)


def test_record_keys_name_their_source_and_halt_flags_are_not_records():
    assert progress.source_of_record_key(progress.record_key("orders-db")) == "orders-db"
    assert progress.source_of_record_key(progress.halt_key("orders-db")) is None
    assert progress.source_of_record_key("something_else") is None


def _record(**extra) -> dict:
    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    record = {"run_id": "manual__1", "dag_id": "pgactive_rolling_upgrade", "step": "cutover", "state": "done",
              "conf": {"target_engine_version": "17.2", "lag_threshold_bytes": 65536},
              "split": {"pg_write": 100, "pg_read": 100}, "phase": "cutover", "percent": 100,
              "write_unavailable_ms": 412.5, "updated_at": start.isoformat()}
    for second, lag in enumerate((120000, 80000, 5000, 0)):
        record = progress.with_lag(record, lag, at=(start + timedelta(seconds=10 * second)).isoformat())
    return {**record, **extra}


def test_page_shows_each_upgrade_with_its_chart_split_unavailability_gates_and_rollback_link():
    gate = progress_page.Gate(task_id="approve_cutover", map_index=-1, subject="Cut over <orders-db>?",
                              options=["Approve", "Reject"], created_at="2026-01-01T12:00:00+00:00")
    page = progress_page.render([
        progress_page.Upgrade(source="orders-db", record=_record(), run_state="running", gates=[gate]),
        progress_page.Upgrade(source="billing-db", record=_record(run_id="manual__0"), run_state="success"),
    ], base_url="")
    in_flight, recent = page.split('<section class="recent">')
    assert 'data-source="orders-db"' in in_flight and 'data-source="billing-db"' in recent
    chart = re.search(r'<svg class="lag-chart" data-points="(\d+)" data-max-bytes="(\d+)"', page)
    assert chart and chart.groups() == ("4", "120000")
    assert re.search(r'<polyline class="lag-line" points="([\d.]+,[\d.]+ ?){4}"', page)
    assert '<td class="to-target">100 %</td>' in page and 'data-route="pg_read"' in page
    assert "412.5 ms" in page
    assert "Cut over &lt;orders-db&gt;?" in page and "<orders-db>" not in page, "record values are escaped"
    assert 'href="/dags/pgactive_rolling_upgrade/runs/manual__1/tasks/approve_cutover"' in page
    assert 'href="/dags/pgactive_upgrade_rollback"' in page


def test_page_says_when_nothing_is_measured_or_running():
    record = {"run_id": "r", "step": "preflight", "state": "running", "conf": {}}
    page = progress_page.render([progress_page.Upgrade(source="orders-db", record=record, run_state="running")])
    assert "No lag measured yet." in page and "not cut over yet" in page and "No traffic moved yet." in page
    assert "No finished upgrade is recorded." in page


def test_shared_reads_read_once_for_concurrent_requests_and_again_after_the_ttl():
    from pgactive_upgrade.airflow.progress_api import RecentReads

    reads = []

    def slow_read():
        reads.append(1)
        time.sleep(0.05)
        return len(reads)

    cache = RecentReads(seconds=0.3)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(cache.get("orders-db", slow_read))) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [1] * 20 and len(reads) == 1
    time.sleep(0.35)
    assert cache.get("orders-db", slow_read) == 2


def test_while_one_caller_reads_again_the_others_get_the_previous_value_only_within_the_grace():
    from pgactive_upgrade.airflow.progress_api import RecentReads

    cache = RecentReads(seconds=0.2, grace=0.3)
    assert cache.peek("orders-db") is None
    assert cache.get("orders-db", lambda: "first") == "first"
    assert cache.peek("orders-db") == ("first",)
    time.sleep(0.25)
    assert cache.peek("orders-db") is None, "stale and nobody reading: this caller is the one to read"
    reading, release = threading.Event(), threading.Event()

    def slow_read():
        reading.set()
        release.wait(5)
        return "second"

    reader = threading.Thread(target=lambda: cache.get("orders-db", slow_read))
    reader.start()
    assert reading.wait(5)
    assert cache.peek("orders-db") == ("first",), "within the grace, the others are not held up by the read"
    time.sleep(0.3)  # now 0.55 s after the first read: past seconds + grace
    assert cache.peek("orders-db") is None, "past the grace the previous value is not answered any more"
    release.set()
    reader.join(5)
    assert cache.peek("orders-db") is None, "a value is as old as its read's start: this one is stale already"
    assert cache.get("orders-db", lambda: "third") == "third" and cache.peek("orders-db") == ("third",)
