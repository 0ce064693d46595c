"""Rollback mid-phase on a live local Airflow: how long until new connections land on the source again.

Each run starts from freshly seeded databases, triggers `pgactive_rolling_upgrade` through the REST API (phases
30 % and 60 %, 60 s settle time), waits until the first phase's health check is running, then triggers
`pgactive_upgrade_rollback` through the REST API and polls HAProxy's read port with fresh connections as role
`app` until every new connection lands on the source.

    PYTHONPATH=include:. .venv/bin/python bench/rollback.py --runs 7

The last line printed is one JSON object with the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg2

from topology import Ports, Topology
from topology.airflow_local import FLEET_SETTINGS, AirflowApiError, LocalAirflow, compile_bytecode
from topology.demo import demo_conf

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = ".local/bench-rollback"
PORT_BASE = 20400
UPGRADE, ROLLBACK = "pgactive_rolling_upgrade", "pgactive_upgrade_rollback"
PHASE_TASK = "traffic_phase.health_check"
ROLLBACK_TASK = "roll_back"
READ_ROUTE = "pg_read"
SOURCE_STREAK = 20  # consecutive fresh connections on the source (and the weight read back as 0) end the polling


# --- landing of new connections, polled in a thread from just before the trigger call ------------------------

@dataclass
class Landing:
    began: float  # monotonic, before connect
    ended: float  # monotonic, after inet_server_port() answered
    port: int | None  # None: the connection failed
    target_weight: int | None


class LandingPoller:
    def __init__(self, topo: Topology, interval: float, timeout: float):
        self.topo, self.interval, self.timeout = topo, interval, timeout
        self.samples: list[Landing] = []
        self.errors: dict[str, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="landing-poller", daemon=True)
        self.dsn = (f"host=127.0.0.1 port={topo.haproxy.read_port} dbname=app user=app "
                    f"password={topo.credentials['app']} connect_timeout=2 application_name=bench_rollback")

    def start(self) -> None:
        self.thread.start()

    def wait(self) -> bool:
        """True once every new connection lands on the source; False after the timeout."""
        self.thread.join(self.timeout + 10)
        return self._returned()

    def _poll(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self._returned():
            began = time.monotonic()
            port = self._landing_port()
            ended = time.monotonic()
            self.samples.append(Landing(began, ended, port, self._target_weight()))
            time.sleep(max(0.0, self.interval - (time.monotonic() - began)))
        self.done.set()

    def _landing_port(self) -> int | None:
        try:
            connection = psycopg2.connect(self.dsn)
        except psycopg2.Error as error:
            self._count("connect", error)
            return None
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT inet_server_port()")
                return cursor.fetchone()[0]
        except psycopg2.Error as error:
            self._count("query", error)
            return None
        finally:
            connection.close()

    def _target_weight(self) -> int | None:
        try:
            return self.topo.haproxy.get_weight(READ_ROUTE, "target")
        except Exception as error:  # the weight is a cross-check only
            self._count("weight", error)
            return None

    def _count(self, phase: str, error: Exception) -> None:
        key = f"{phase}:{getattr(error, 'pgcode', None) or type(error).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def _returned(self) -> bool:
        tail = self.samples[-SOURCE_STREAK:]
        return (len(tail) == SOURCE_STREAK and all(s.port == self.topo.old_pg.port for s in tail)
                and tail[-1].target_weight == 0)

    def figures(self, asked: float) -> dict:
        """Seconds after the trigger call: first connection of the final all-source streak, last one elsewhere."""
        source = self.topo.old_pg.port
        elsewhere = [i for i, s in enumerate(self.samples) if s.port != source]
        streak_start = elsewhere[-1] + 1 if elsewhere else 0
        weight_zero = next((s.ended for s in self.samples if s.target_weight == 0 and s.ended > asked), None)
        figures = {
            "samples": len(self.samples),
            "on_target": sum(1 for s in self.samples if s.port == self.topo.new_pg.port),
            "last_elsewhere_s": _since(asked, self.samples[elsewhere[-1]].ended) if elsewhere else None,
            "weight_zero_s": _since(asked, weight_zero) if weight_zero else None,
            "poll_errors": dict(self.errors),
        }
        if self._returned():
            figures["returned_s"] = _since(asked, self.samples[streak_start].ended)
        return figures


def _since(start: float, moment: float) -> float:
    return round(moment - start, 3)


# --- Airflow helpers -------------------------------------------------------------------------------------------

def local_airflow(topo: Topology, preload: bool) -> LocalAirflow:
    return LocalAirflow(
        home=topo.state_dir / "airflow",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        port=topo.ports.airflow_api,
        extra_env={**topo.airflow_connections_env(), "PGU_PG_BIN_DIRS": str(topo.new_pg.bin_dir),
                   **(FLEET_SETTINGS if preload else {})},
        python_paths=[REPO / "include", REPO],
    )


def task_instance(airflow: LocalAirflow, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict | None:
    suffix = f"/{map_index}" if map_index >= 0 else ""
    try:
        return airflow.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}{suffix}")
    except AirflowApiError as error:
        if error.status == 404:
            return None
        raise


def wait_for_task_state(airflow: LocalAirflow, run_id: str, task_id: str, map_index: int, wanted: str,
                        timeout: float) -> None:
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        ti = task_instance(airflow, UPGRADE, run_id, task_id, map_index)
        state = ti and ti.get("state")
        if state == wanted:
            return
        if state in ("failed", "upstream_failed", "skipped") or airflow.run_state(UPGRADE, run_id) == "failed":
            raise RuntimeError(f"{task_id}[{map_index}] ended {state} before reaching {wanted}: "
                               f"{states_of(airflow, UPGRADE, run_id)}")
        time.sleep(0.2)
    raise TimeoutError(f"{task_id}[{map_index}] not {wanted} after {timeout} s (last {state}): "
                       f"{states_of(airflow, UPGRADE, run_id)}")


def states_of(airflow: LocalAirflow, dag_id: str, run_id: str) -> dict[str, str | None]:
    return {ti["task_id"] + ("" if ti.get("map_index", -1) == -1 else f"[{ti['map_index']}]"): ti["state"]
            for ti in airflow.task_instances(dag_id, run_id)}


def wait_for_run_end(airflow: LocalAirflow, dag_id: str, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = airflow.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed") or time.monotonic() > deadline:
            return run
        time.sleep(0.25)


def xcom_value(airflow: LocalAirflow, dag_id: str, run_id: str, task_id: str):
    try:
        entry = airflow.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
    except AirflowApiError:
        return None
    value = entry.get("value")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def log_events(airflow: LocalAirflow, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, str]:
    """First timestamp of each event (its first 60 characters) in the task's first try log."""
    events: dict[str, str] = {}
    try:
        entries = airflow.task_log(dag_id, run_id, task_id, 1, map_index=map_index)
    except AirflowApiError:
        return events
    for entry in entries:
        if isinstance(entry, dict) and entry.get("event") and entry.get("timestamp"):
            events.setdefault(str(entry["event"])[:60], entry["timestamp"])
    return events


def first_event(events: dict[str, str], prefix: str) -> str | None:
    return next((stamp for event, stamp in events.items() if event.startswith(prefix)), None)


def wall_offset(asked_wall: float, stamp: str | None) -> float | None:
    if not stamp:
        return None
    return round(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - asked_wall, 3)


# --- one run ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    number: int
    upgrade_run_id: str
    rollback_run_id: str = ""
    returned_s: float | None = None
    rollback_success_s: float | None = None
    upgrade_failed_s: float | None = None
    rollback_total_ms: float | None = None
    rollback_state: str | None = None
    upgrade_state: str | None = None
    trigger_call_s: float | None = None
    load_1min: float | None = None
    landing: dict = field(default_factory=dict)
    timeline_s: dict = field(default_factory=dict)
    rollback_steps_ms: dict = field(default_factory=dict)
    upgrade_states: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


def fresh(topo: Topology) -> None:
    """As tests/conftest.py fresh_databases: seeded demo database, wiped-and-seeded moto, default HAProxy weights."""
    topo.up()
    topo.seed_database(rows=2000)
    topo.reset_aws()
    topo.seed_aws()
    topo.haproxy.reset_weights()


def measure(airflow: LocalAirflow, topo: Topology, number: int, args) -> Run:
    fresh(topo)
    conf = {**demo_conf(topo), "shift_percentages": [30, 60], "phase_settle_seconds": args.settle_seconds,
            "decommission": "keep"}
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    run = Run(number, airflow.trigger(UPGRADE, conf, run_id=f"bench_rollback__{stamp}_{number}"))
    wait_for_task_state(airflow, run.upgrade_run_id, PHASE_TASK, 0, "running", args.phase_timeout)
    time.sleep(args.into_phase)
    weight = topo.haproxy.get_weight(READ_ROUTE, "target")
    if weight != 30:
        run.problems.append(f"read route target weight {weight} mid-phase, expected 30")

    poller = LandingPoller(topo, args.poll_interval, args.return_timeout)
    poller.start()
    time.sleep(0.2)  # a few samples of the phase's split before the trigger
    run.load_1min = round(os.getloadavg()[0], 2)
    asked_wall, asked = time.time(), time.monotonic()
    run.rollback_run_id = airflow.trigger(ROLLBACK, {"source_instance": "orders-db", "reason": "bench"},
                                          run_id=f"bench_rollback__{stamp}_{number}_rb")
    run.trigger_call_s = round(time.monotonic() - asked, 3)
    if not poller.wait():
        run.problems.append(f"traffic not back on the source within {args.return_timeout} s")
    run.landing = poller.figures(asked)
    run.returned_s = run.landing.pop("returned_s", None)

    rollback = wait_for_run_end(airflow, ROLLBACK, run.rollback_run_id, args.run_timeout)
    upgrade = wait_for_run_end(airflow, UPGRADE, run.upgrade_run_id, args.run_timeout)
    run.rollback_state, run.upgrade_state = rollback["state"], upgrade["state"]
    if rollback["state"] == "success":
        run.rollback_success_s = wall_offset(asked_wall, rollback.get("end_date"))
    else:
        run.problems.append(f"rollback run {rollback['state']}")
    if upgrade["state"] == "failed":
        run.upgrade_failed_s = wall_offset(asked_wall, upgrade.get("end_date"))
    else:
        run.problems.append(f"upgrade run {upgrade['state']}, expected failed (halted)")
        stop_upgrade(airflow, run.upgrade_run_id)
    run.upgrade_states = states_of(airflow, UPGRADE, run.upgrade_run_id)
    for task in ("traffic_phase.shift[1]", "cutover"):
        if run.upgrade_states.get(task) == "success":
            run.problems.append(f"{task} succeeded after the halt")
    if topo.haproxy.get_weight(READ_ROUTE, "target"):
        run.problems.append("the halted upgrade moved traffic again")

    result = xcom_value(airflow, ROLLBACK, run.rollback_run_id, ROLLBACK_TASK) or {}
    if isinstance(result, dict):
        run.rollback_total_ms = result.get("total_ms")
        run.rollback_steps_ms = result.get("steps_ms") or {}
    run.timeline_s = timeline(airflow, run, asked_wall, rollback)
    return run


def stop_upgrade(airflow: LocalAirflow, run_id: str) -> None:
    """A run that did not halt must not hold max_active_runs=1 (and the databases) for the next run."""
    try:
        airflow.api("PATCH", f"dags/{UPGRADE}/dagRuns/{run_id}", {"state": "failed"})
    except AirflowApiError as error:
        print(f"       could not mark {run_id} failed: {error}", flush=True)


def timeline(airflow: LocalAirflow, run: Run, asked_wall: float, rollback_run: dict) -> dict:
    """Where the time goes, in seconds after the trigger call (Airflow's own timestamps and the task's events)."""
    ti = task_instance(airflow, ROLLBACK, run.rollback_run_id, ROLLBACK_TASK) or {}
    check = task_instance(airflow, UPGRADE, run.upgrade_run_id, PHASE_TASK, 0) or {}
    gate = task_instance(airflow, UPGRADE, run.upgrade_run_id, "traffic_phase.wait_for_previous_phase", 1) or {}
    events = log_events(airflow, ROLLBACK, run.rollback_run_id, ROLLBACK_TASK)
    points = {
        "rollback_run_queued": rollback_run.get("queued_at"),
        "rollback_run_started": rollback_run.get("start_date"),
        "task_scheduled": ti.get("scheduled_when"),
        "task_queued": ti.get("queued_when"),
        "task_started": ti.get("start_date"),
        "dag_parse_began": first_event(events, "Filling up the DagBag"),
        "dag_parse_done": first_event(events, "Worker startup parse complete"),
        "halt_written": events.get("rollback_requested"),
        "phase_check_ended": check.get("end_date"),
        "next_gate_ended": gate.get("end_date"),
        "aws_hook_built": first_event(events, "AWS Connection"),
        "rolled_back": events.get("rolled_back"),
        "task_ended": ti.get("end_date"),
    }
    offsets = {name: wall_offset(asked_wall, stamp) for name, stamp in points.items()}
    if offsets["halt_written"] is not None and offsets["rolled_back"] is not None and run.rollback_total_ms is not None:
        # between the halt and Rollback.run(): building the Upgrade and taking the lock on the source
        offsets["wait_and_build"] = round(offsets["rolled_back"] - run.rollback_total_ms / 1000 - offsets["halt_written"], 3)
    offsets["phase_check_state"] = check.get("state")
    return offsets


# --- summary ---------------------------------------------------------------------------------------------------

def median_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summary(runs: list[Run]) -> dict:
    returned = [r.returned_s for r in runs if r.returned_s is not None]
    timeline_keys = [k for k in (runs[0].timeline_s if runs else {}) if k != "phase_check_state"]
    return {
        "runs": len(runs),
        "returned_s": {"median": median_of(returned), "max": round(max(returned), 3) if returned else None,
                       "min": round(min(returned), 3) if returned else None},
        "not_returned": sum(1 for r in runs if r.returned_s is None),
        "rollback_success_s_median": median_of([r.rollback_success_s for r in runs]),
        "upgrade_failed_s_median": median_of([r.upgrade_failed_s for r in runs]),
        "rollback_total_ms_median": median_of([r.rollback_total_ms for r in runs]),
        "weight_zero_s_median": median_of([r.landing.get("weight_zero_s") for r in runs]),
        "timeline_s_median": {k: median_of([r.timeline_s.get(k) for r in runs]) for k in timeline_keys},
        "problems": sum(len(r.problems) for r in runs),
        "load_1min_median": median_of([r.load_1min for r in runs]),
        "cpus": os.cpu_count(),
        "bar_median_under_s": 5.0,
    }


def describe(run: Run) -> str:
    timeline_text = " ".join(f"{k}={v}" for k, v in run.timeline_s.items())
    steps = " ".join(f"{k}={v}" for k, v in run.rollback_steps_ms.items())
    return (f"run {run.number:2d} returned {run.returned_s} s  rollback run success {run.rollback_success_s} s  "
            f"upgrade failed {run.upgrade_failed_s} s  rollback task total {run.rollback_total_ms} ms  "
            f"trigger call {run.trigger_call_s} s  load {run.load_1min}\n"
            f"       landing: {json.dumps(run.landing)}\n"
            f"       timeline_s: {timeline_text}\n"
            f"       rollback steps_ms: {steps}"
            + (f"\n       PROBLEMS: {run.problems}  states: {run.upgrade_states}" if run.problems else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle-seconds", type=int, default=60, help="the upgrade's phase_settle_seconds")
    parser.add_argument("--into-phase", type=float, default=0.0,
                        help="seconds to wait after the health check started running before the rollback")
    parser.add_argument("--poll-interval", type=float, default=0.03, help="seconds between fresh connections")
    parser.add_argument("--phase-timeout", type=float, default=240, help="seconds to reach the first phase's check")
    parser.add_argument("--return-timeout", type=float, default=90, help="seconds for traffic to return")
    parser.add_argument("--run-timeout", type=float, default=180, help="seconds for each run to end")
    parser.add_argument("--keep-up", action="store_true", help="leave Airflow and the topology running at the end")
    parser.add_argument("--no-preload", dest="preload", action="store_false",
                        help="task processes import every module themselves (no forkserver preload)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave include/, dags/ and plugins/ without bytecode")
    args = parser.parse_args(argv)

    topo = Topology(STATE_DIR, Ports.from_base(PORT_BASE))
    airflow = None
    runs: list[Run] = []
    try:
        topo.up()
        airflow = local_airflow(topo, args.preload)
        if args.compile:
            compile_bytecode(REPO)
        started = time.monotonic()
        airflow.start(timeout=240)
        airflow.wait_for_dag(UPGRADE)
        airflow.wait_for_dag(ROLLBACK)
        print(f"Airflow up at {airflow.url} after {time.monotonic() - started:.1f} s", flush=True)
        for number in range(1, args.runs + 1):
            run = measure(airflow, topo, number, args)
            print(describe(run), flush=True)
            runs.append(run)
    finally:
        if not args.keep_up:
            if airflow is not None:
                airflow.stop()
            topo.down()
    result = {**summary(runs), "preload": FLEET_SETTINGS if args.preload else None, "bytecode_compiled": args.compile}
    print(json.dumps(result), flush=True)
    return 0 if runs and not result["problems"] and not result["not_returned"] else 1


if __name__ == "__main__":
    sys.exit(main())
