"""On a real local Airflow and one real upgrade run: who may read its progress, the metrics and traces it sent (OpenTelemetry),
the size of every event line it logged, and the upgrades page in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pgactive_upgrade.events import MAX_EVENT_BYTES
from topology.airflow_local import AirflowApiError

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
PROGRESS = "/pgactive-upgrade/progress/orders-db"


def refused(airflow, path: str, token: str | None) -> AirflowApiError:
    with pytest.raises(AirflowApiError) as error:
        airflow.get(path, token)
    return error.value


def test_progress_is_answered_only_to_users_who_may_read_the_upgrade_runs(observed_airflow, upgrade_run):
    airflow = observed_airflow
    for user in ("admin", "viewer"):
        answer = airflow.get(PROGRESS, airflow.token_for(user))
        assert answer["run_id"] == upgrade_run["run_id"] and answer["split"] == {"pg_write": 100, "pg_read": 100}
        assert answer["write_unavailable_ms"] == upgrade_run["record"]["write_unavailable_ms"]
    assert refused(airflow, PROGRESS, airflow.token_for("outsider")).status == 403
    assert refused(airflow, PROGRESS, None).status == 401
    assert refused(airflow, "/pgactive-upgrade/ui", airflow.token_for("outsider")).status == 403
    assert refused(airflow, "/pgactive-upgrade/progress/unknown-db", airflow.token_for("admin")).status == 404


@pytest.mark.parametrize("bad", ["orders--db", "1orders", "orders_db", "o" * 64, "orders-db-"])
def test_a_source_that_is_not_an_rds_identifier_is_refused_naming_it(observed_airflow, bad):
    error = refused(observed_airflow, f"/pgactive-upgrade/progress/{bad}", observed_airflow.token_for("admin"))
    assert error.status == 422
    assert "source_instance" in error.body


def gauge_values(otlp, name: str) -> list[float]:
    points = otlp.metric(f"airflow.pgactive_upgrade.{name}")
    assert all(p["kind"] == "gauge" and p["attributes"]["source"] == "orders-db" for p in points), points[:3]
    return [p["value"] for p in points]


def test_metrics_reach_the_otlp_receiver_with_the_recorded_values(otlp, upgrade_run):
    """Gauges are sampled at each export (every second here, and when a task process ends): the receiver sees the
    last value of each process at each export, not every value set."""
    record = upgrade_run["record"]
    lag = gauge_values(otlp, "lag_bytes.orders-db")
    assert lag and all(value >= 0 for value in lag), lag
    assert record["replication_lag_bytes"] in lag, (record["replication_lag_bytes"], lag)

    cutover = otlp.metric("airflow.pgactive_upgrade.cutover.write_unavailable_ms.orders-db")
    assert cutover and cutover[-1]["kind"] == "exponential_histogram", cutover
    assert (cutover[-1]["count"], cutover[-1]["sum"]) == (1, record["write_unavailable_ms"])
    assert 0 < record["write_unavailable_ms"] < 30_000

    assert {25, 50, 75, 100} <= set(gauge_values(otlp, "phase_percent.orders-db"))
    read_split = otlp.metric("airflow.pgactive_upgrade.split.orders-db.pg_read")
    assert {p["value"] for p in read_split} >= {25, 50, 75, 100}
    assert all(p["attributes"]["route"] == "pg_read" for p in read_split)
    assert 100 in gauge_values(otlp, "split.orders-db.pg_write")
    assert set(gauge_values(otlp, "conflicts.orders-db")) == {0}
    rates = otlp.metric("airflow.pgactive_upgrade.verify.rows_per_second.orders-db")
    assert {p["attributes"]["step"] for p in rates} == {"verify_before_cutover", "verify"}
    assert all(p["value"] > 0 for p in rates)
    assert any(not p["name"].startswith("airflow.pgactive_upgrade.") for p in otlp.points), \
        "Airflow's own metrics go the same way"


def test_traces_carry_the_runs_tasks_and_the_cutovers_steps(otlp, upgrade_run):
    run_spans = [s for s in otlp.spans if s["attributes"].get("airflow.dag_run.run_id") == upgrade_run["run_id"]]
    worker = {s["name"]: s for s in run_spans if s["name"].startswith("worker.")}
    assert {"worker.validate_request", "worker.cutover", "worker.verify"} <= set(worker), sorted(worker)
    cutover = worker["worker.cutover"]
    steps = {s["name"]: s for s in otlp.spans
             if s["trace_id"] == cutover["trace_id"] and s["name"].startswith("pgactive_upgrade.cutover.")}
    assert {"pgactive_upgrade.cutover.fence", "pgactive_upgrade.cutover.caught_up",
            "pgactive_upgrade.cutover.sequences", "pgactive_upgrade.cutover.switched"} <= set(steps), sorted(steps)
    in_cutover = {s["span_id"] for s in otlp.spans if s["trace_id"] == cutover["trace_id"]}
    assert all(step["parent_id"] in in_cutover for step in steps.values()), "the steps nest inside the task's span"
    assert steps["pgactive_upgrade.cutover.fence"]["attributes"]["token"].startswith(upgrade_run["run_id"])
    assert len({s["trace_id"] for s in run_spans}) == 1, "one trace per DAG run"


# What Airflow adds to every line of a task log (the event's time and place, the task instance's ids).
AIRFLOW_CONTEXT = {"timestamp", "filename", "lineno", "ti_id", "try_number", "map_index", "task_id", "run_id",
                   "dag_id", "trigger_id", "trigger_class"}


def test_every_event_line_of_the_run_stays_under_the_limit(observed_airflow, upgrade_run):
    """Every line the package logged in the run's task and trigger logs (its events, its modules' loggers, its
    triggers): the line without Airflow's own context fields stays under MAX_EVENT_BYTES."""
    folder = observed_airflow.home / "logs" / "dag_id=pgactive_rolling_upgrade" / f"run_id={upgrade_run['run_id']}"
    files = sorted(folder.rglob("*.log*"))
    assert len(files) >= 15, files
    lines, events, longest, longest_whole = 0, 0, (0, ""), 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not str(entry.get("logger", "")).startswith("pgactive_upgrade"):
                continue
            lines += 1
            events += entry["logger"] == "pgactive_upgrade"
            own = {key: value for key, value in entry.items() if key not in AIRFLOW_CONTEXT}
            size = len(json.dumps(own).encode())
            longest = max(longest, (size, f"{path.relative_to(folder)}: {json.dumps(own)[:300]}"))
            longest_whole = max(longest_whole, len(line.encode()))
    assert events >= 30 and lines > events, f"only {events} events and {lines} lines of the package in {len(files)} logs"
    assert longest[0] < MAX_EVENT_BYTES, longest
    print(f"{lines} package lines ({events} events) in {len(files)} logs; the longest {longest[0]} bytes "
          f"({longest_whole} with Airflow's context)")


def test_the_upgrades_page_shows_the_run_in_chromium(observed_airflow, upgrade_run, tmp_path):
    from playwright.sync_api import sync_playwright

    from topology.chromium import launch_options

    airflow, record = observed_airflow, upgrade_run["record"]
    screenshot = tmp_path / "progress-page.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), viewport={"width": 1280, "height": 1100},
            **launch_options(tmp_path / "chromium-profile"))
        try:
            browser.add_cookies([{"name": "_token", "value": airflow.token_for("viewer"), "url": airflow.url}])
            page = browser.new_page()
            page.goto(f"{airflow.url}/plugin/pgactive-upgrades", wait_until="networkidle")
            frame = page.frame_locator("iframe").first
            card = frame.locator('article.upgrade[data-source="orders-db"]')
            card.wait_for(timeout=30_000)
            chart = card.locator("svg.lag-chart")
            points = int(chart.get_attribute("data-points"))
            assert points == len([p for p in record["lag_history"] if p["bytes"] is not None]) and points >= 5
            assert int(chart.get_attribute("data-max-bytes")) == max(p["bytes"] for p in record["lag_history"]
                                                                     if p["bytes"] is not None)
            assert card.locator("polyline.lag-line").count() == 1
            assert card.locator("circle").count() == points
            assert card.locator("td.to-target").all_inner_texts() == ["100 %", "100 %"]
            assert card.locator(".write-unavailable").inner_text() == f"{record['write_unavailable_ms']} ms"
            assert card.locator(".step").inner_text() == f"{record['step']} ({record['state']})"
            assert upgrade_run["run_id"] in card.locator("dl.facts a").first.inner_text()
            assert card.locator("a.rollback-link").get_attribute("href").endswith("/dags/pgactive_upgrade_rollback")
            assert card.locator(".gates").inner_text() == "No gate is waiting for an answer."
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    saved = REPO / ".local" / "screenshots" / "progress-page.png"
    saved.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, saved)
    print(f"screenshot: {saved} ({upgrade_run['writes']} writes during the run, {upgrade_run['write_errors']} failed)")
