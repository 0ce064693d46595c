"""The progress endpoint under 20 concurrent clients on a live local Airflow: latency percentiles.

Starts its own local Airflow (SQLite metadata database, one api-server worker, the repository's DAGs and plugin,
every component on 127.0.0.1), stores a full-size progress record (a lag history at its bound) and a halt flag
through the REST API, then runs two loads of `--seconds` each against
GET /pgactive-upgrade/progress/orders-db with a viewer's token, each client on its own keep-alive connection:
- `back_to_back`: every client sends its next request as soon as the answer arrived (the worst case);
- `polling`: every client asks once per `--poll-interval` seconds (dashboards refreshing), each starting at a random
  moment of the first interval (browsers are not synchronized).
While they run, another thread rewrites the record once a second (a live upgrade records its steps and lag).
Each answer is checked (HTTP 200 and the recorded run id). The same loads are run against Airflow's own
GET /api/v2/version on the same server (no database, no authorization): the floor that the machine's contention
sets for any endpoint, reported beside ours with the ratios ours/floor. The client runs on the same machine.

    PYTHONPATH=include:. .venv/bin/python bench/progress.py --port-base 23400

The last line printed is one JSON object with the summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import threading
import time
from datetime import datetime, timedelta, UTC
from pathlib import Path

from pgactive_upgrade import progress
from topology.airflow_local import LocalAirflow

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".local" / "bench-progress"
PORT_BASE = 23400
SOURCE = "orders-db"
PATH = f"/pgactive-upgrade/progress/{SOURCE}"
FLOOR_PATH = "/api/v2/version"
TARGET_P99_MS = 50.0


def local_airflow(port: int, api_workers: int = 1) -> LocalAirflow:
    return LocalAirflow(
        home=STATE_DIR / "airflow", dags_folder=REPO / "dags", plugins_folder=REPO / "plugins", port=port,
        extra_env={"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                   "AIRFLOW__API__WORKERS": str(api_workers)},
        python_paths=[REPO / "include", REPO],
    )


def full_record(run_id: str, step: int) -> dict:
    start = datetime.now(UTC) - timedelta(hours=2)
    record = progress.progress_record(
        dag_id="pgactive_rolling_upgrade", run_id=run_id, conf={"source_instance": SOURCE, "target_engine_version": "17.2"},
        step="traffic_phase.health_check", state="running", phase="traffic_phase.shift", percent=50,
        split={"pg_write": 0, "pg_read": 50}, conflict_baseline={}, step_counter=step)
    for index in range(progress.LAG_HISTORY_POINTS):
        record = progress.with_lag(record, 1000 + index * 37 % 5000, at=(start + timedelta(seconds=5 * index)).isoformat())
    return record


def put_variable(airflow: LocalAirflow, key: str, value: dict) -> None:
    body = {"key": key, "value": json.dumps(value)}
    try:
        airflow.api("PATCH", f"variables/{key}", body)
    except Exception:
        airflow.api("POST", "variables", body)


def client(port: int, path: str, token: str, run_id: str, stop: threading.Event, pause: float, out: list,
           errors: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if pause:
        stop.wait(random.uniform(0, pause))
    while not stop.is_set():
        began = time.perf_counter()
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - began) * 1000
            if response.status != 200 or (path == PATH and json.loads(body)["run_id"] != run_id):
                errors.append(f"{response.status}: {body[:200]!r}")
            else:
                out.append(elapsed)
        except (OSError, http.client.HTTPException, ValueError) as error:
            errors.append(type(error).__name__)
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        if pause:
            stop.wait(max(0.0, pause - (time.perf_counter() - began)))
    connection.close()


def load(port: int, path: str, token: str, run_id: str, clients: int, seconds: float, pause: float) -> dict:
    stop, latencies, errors = threading.Event(), [], []
    threads = [threading.Thread(target=client, args=(port, path, token, run_id, stop, pause, latencies, errors),
                                daemon=True) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=35)
    wall = time.monotonic() - started
    return summary(latencies, errors, wall)


def summary(latencies: list[float], errors: list, wall: float) -> dict:
    ordered = sorted(latencies)

    def pct(p: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2) if ordered else None

    return {"requests": len(ordered), "errors": len(errors), "first_errors": errors[:3],
            "requests_per_s": round(len(ordered) / wall, 1), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(ordered[-1], 2) if ordered else None,
            "mean_ms": round(statistics.fmean(ordered), 2) if ordered else None}


def writer(airflow: LocalAirflow, run_id: str, stop: threading.Event) -> None:
    step = 0
    while not stop.wait(1.0):
        step += 1
        put_variable(airflow, progress.record_key(SOURCE), full_record(run_id, step))


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value and base else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-base", type=int, default=PORT_BASE, help="the api-server listens on base + 80")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between a polling client's asks")
    parser.add_argument("--api-workers", type=int, default=1, help="the api-server's [api] workers")
    parser.add_argument("--keep-up", action="store_true", help="leave Airflow running at the end")
    args = parser.parse_args(argv)

    airflow = local_airflow(args.port_base + 80, args.api_workers)
    airflow.stop()  # an api-server left up by --keep-up may run other code or another worker count
    started = time.monotonic()
    airflow.start(timeout=240)
    print(f"Airflow healthy after {time.monotonic() - started:.1f} s at {airflow.url}", flush=True)
    try:
        run_id = "manual__bench_progress"
        record = full_record(run_id, 0)
        put_variable(airflow, progress.record_key(SOURCE), record)
        put_variable(airflow, progress.halt_key(SOURCE), {"run_id": "an_earlier_run"})
        token = airflow.token_for("viewer")
        for path in (PATH, FLOOR_PATH):  # warm-up: imports, connection pools
            load(airflow.port, path, token, run_id, 2, 2, 0)
        stop_writer = threading.Event()
        writing = threading.Thread(target=writer, args=(airflow, run_id, stop_writer), daemon=True)
        writing.start()
        results, load_before = {}, os.getloadavg()[0]
        for name, pause in (("back_to_back", 0.0), ("polling", args.poll_interval)):
            for target, path in (("floor", FLOOR_PATH), ("", PATH)):
                key = f"{name}_floor" if target else name
                results[key] = load(airflow.port, path, token, run_id, args.clients, args.seconds, pause)
                print(f"{key} ({path}): {json.dumps(results[key])}", flush=True)
        stop_writer.set()
        writing.join(timeout=10)
    finally:
        if not args.keep_up:
            airflow.stop()
    worst = results["back_to_back"]["p99_ms"]
    result = {
        "clients": args.clients, "seconds_each": args.seconds, "record_bytes": len(json.dumps(record)),
        **results, "poll_interval_s": args.poll_interval, "target_p99_ms": TARGET_P99_MS,
        "p99_over_target": round(worst / TARGET_P99_MS, 2) if worst else None,
        "polling_p99_over_target": _ratio(results["polling"]["p99_ms"], TARGET_P99_MS),
        "p50_over_floor": _ratio(results["back_to_back"]["p50_ms"], results["back_to_back_floor"]["p50_ms"]),
        "p99_over_floor": _ratio(worst, results["back_to_back_floor"]["p99_ms"]),
        "polling_p99_over_floor": _ratio(results["polling"]["p99_ms"], results["polling_floor"]["p99_ms"]),
        "api_server_workers": args.api_workers, "metadata_db": "sqlite", "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
