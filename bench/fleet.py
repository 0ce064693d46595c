"""A fleet of upgrades on one local Airflow: N upgrades of N different sources at once, RDS slow on purpose.

One Airflow (LocalExecutor, parallelism 32, PostgreSQL metadata database on the topology's 17 server) runs first
one upgrade alone, then N at once. RDS answers through topology/slow_rds.py: a new instance stays `creating` for
`--create-seconds`, a reboot `rebooting` for `--reboot-seconds` (harness-made, the package is unchanged).

    PYTHONPATH=include:. .venv/bin/python bench/fleet.py --n 20

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from psycopg2 import sql

from topology import Ports, Topology, aws, seed
from topology.airflow_local import COMPONENTS as AIRFLOW_COMPONENTS
from topology.airflow_local import FLEET_SETTINGS, AirflowApiError, LocalAirflow, compile_bytecode
from topology.airflow_metadb import provision_metadata_db
from topology.postgres import HOST
from topology.slow_rds import SlowRds

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = ".local/bench-fleet"
PORT_BASE = 17400
SLOW_RDS_PORT = PORT_BASE + 51
UPGRADE = "pgactive_rolling_upgrade"
ZONE = "fleet.example.internal"
MONITOR_NAME = "bench_fleet_monitor"
# Room for 21 upgrades on one pair of servers (preflight checks it): per upgrade the source holds 1 + 2 sync slots and
# senders, the target 1 + 2 logical replication workers, and after cutover the reverse direction the other way round.
FLEET_SERVER_SETTINGS = {
    "max_connections": 800,
    "max_replication_slots": 100,
    "max_wal_senders": 100,
    "max_worker_processes": 128,
    "max_logical_replication_workers": 100,
}
AIRFLOW_SETTINGS = {
    "AIRFLOW__CORE__PARALLELISM": "32",  # executor slots: not the cap measured here
    "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "128",  # the upgrade DAG sets no max_active_tasks of its own
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
    # Airflow's defaults, as a deployment runs (the test harness shortens them to see DAG changes and heartbeats
    # sooner): re-parsing the DAG files every 5 s and a heartbeat per running task every second cost CPU the fleet needs.
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "300",
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "5",
    # Each task process parses the DAG file first; with 16 starting at once on 2 cores that took over the default
    # 30 s, every start was rescheduled and the fleet made no progress (see bench/README.md).
    "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STEP_POOL = "pgactive_upgrade"  # created with --pool-slots, named to the DAG by PGACTIVE_UPGRADE_POOL


# --- N sources on one pair of servers, in moto and Route 53 --------------------------------------------------

def source_id(k: int) -> str:
    return f"fleet-{k}"


def dbname(k: int) -> str:
    return f"fleet_{k}"


def app_role(k: int) -> str:
    return f"fleet_app_{k}"


def admin_conn_id(k: int) -> str:
    return f"pgu_db_admin_fleet_{k}"


def seed_source(topo: Topology, k: int, rows: int) -> None:
    """Database fleet_k (filled on 15, empty on 17), owned by its own application role on both servers: the cutover
    fences application roles server-wide, so each upgrade has its own."""
    role, database = app_role(k), dbname(k)
    password = secrets.token_urlsafe(18)  # nobody logs in as it here; never printed
    for server in (topo.old_pg, topo.new_pg):
        connection = server.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), (password,))
                cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                            sql.Identifier(role)))
        finally:
            connection.close()
    seed.fill(topo.old_pg, rows, database, role)


def seed_routes(topo: Topology, sources: list[int]) -> str:
    """One hosted zone; per source a writer and a reader record, weighted records set through the package's own
    controller (all on the source) before the runs, as the applications would already resolve them."""
    from pgactive_upgrade.traffic import build_controller

    route53, rds = topo.aws_client("route53"), topo.aws_client("rds")
    zone = route53.create_hosted_zone(Name=ZONE, CallerReference=f"bench-fleet-{time.time()}")["HostedZone"]["Id"]
    zone_id = zone.split("/")[-1]
    for k in sources:
        endpoint = rds.describe_db_instances(DBInstanceIdentifier=source_id(k))["DBInstances"][0]["Endpoint"]
        address = (endpoint["Address"], endpoint["Port"])
        controller = build_controller(traffic(zone_id, k), source_endpoint=address, target_endpoint=address,
                                      route53_client=route53)
        controller.set_target_percent(0)
    return zone_id


def traffic(zone_id: str, k: int) -> dict:
    return {"controller": "route53", "route53": {"hosted_zone_id": zone_id, "ttl": 5, "routes": [
        {"name": f"writer.{source_id(k)}.{ZONE}", "carries_writes": True},
        {"name": f"reader.{source_id(k)}.{ZONE}", "carries_writes": False},
    ]}}


def conf(topo: Topology, zone_id: str, k: int, args: argparse.Namespace) -> dict:
    source = source_id(k)
    return {
        "source_instance": source,
        "target_engine_version": "17.2",
        "replication_driver": "native",
        "exclude_schemas": ["scratch"],
        "shift_percentages": [50],
        "phase_settle_seconds": args.settle_seconds,
        "rds_poll_seconds": args.rds_poll_seconds,
        "lag_threshold_bytes": 65536,
        "cutover_deadline_seconds": 30,
        "traffic": traffic(zone_id, k),
        "allow_source_reboot": True,  # moto's sources run a default parameter group without logical replication
        "decommission": "keep",
        "endpoint_overrides": topo.endpoint_overrides(source, f"{source}-pg17"),
        "application_roles": [app_role(k)],
        "db_conn_id": admin_conn_id(k),
    }


def connections_env(topo: Topology, slow: SlowRds, sources: list[int]) -> dict[str, str]:
    env = topo.airflow_connections_env()
    env["AIRFLOW_CONN_PGU_AWS"] = json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                              "extra": {"endpoint_url": slow.url, "region_name": aws.REGION}})
    for k in sources:
        env[f"AIRFLOW_CONN_{admin_conn_id(k).upper()}"] = json.dumps({
            "conn_type": "postgres", "host": HOST, "port": topo.old_pg.port, "login": "postgres",
            "password": topo.credentials["postgres"], "schema": dbname(k)})
    env["AIRFLOW_VAR_PGACTIVE_UPGRADE_DEPLOYMENT"] = json.dumps(topo.deployment(
        sources=[source_id(k) for k in sources], admin_conn_ids=[admin_conn_id(k) for k in sources]))
    return env


# --- what runs at once: sampled from the metadata database and /proc ------------------------------------------

@dataclass
class Sample:
    at: float
    running: list[tuple[str, str, int]]  # (run_id, task_id, map_index)
    deferred: int
    queued: int
    in_step_pool: int  # running tasks of the steps' pool
    queued_in_step_pool: int  # queued: they hold a slot while the executor starts them
    scheduled_in_step_pool: int  # ready, waiting for the scheduler to queue them
    runs: Counter
    connections: int
    creating: int  # instances RDS reports `creating` now


@dataclass
class Monitor:
    airflow: LocalAirflow
    slow: SlowRds
    run_ids: list[str]
    interval: float
    services: dict[str, int]  # the topology's servers and this bench: name -> pid
    samples: list[Sample] = field(default_factory=list)
    cpu_first: dict[str, int] = field(default_factory=dict)  # component -> ticks of its session at the start
    cpu_last: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.connection = metadata_connection(self.airflow)
        self.leaders = {name: pid for name in AIRFLOW_COMPONENTS if (pid := self.airflow._read_pid(name))}
        self.machine_first = machine_busy_ticks()
        self.cpu_first = self.cpu_last = self._session_ticks()
        self.thread = threading.Thread(target=self._loop, name="fleet-monitor", daemon=True)

    def start(self) -> Monitor:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.cpu_last = self._session_ticks()
        self.machine_last = machine_busy_ticks()
        self.ended = time.monotonic()
        with self.connection.cursor() as cursor:  # tasks that needed more than one try (a retry after a failure)
            cursor.execute("SELECT task_id, count(*) FROM task_instance WHERE dag_id = %s AND run_id = ANY(%s) AND "
                           "try_number > 1 GROUP BY 1 ORDER BY 1", (UPGRADE, self.run_ids))
            self.retried = dict(cursor.fetchall())
        self.connection.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.samples.append(self._sample())
            except psycopg2.Error as error:
                print(f"   monitor: {type(error).__name__}: {str(error).strip()[:200]}", flush=True)
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _sample(self) -> Sample:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT run_id, task_id, map_index, state, pool FROM task_instance WHERE dag_id = %s AND "
                           "run_id = ANY(%s) AND state IN ('running', 'deferred', 'queued', 'scheduled')",
                           (UPGRADE, self.run_ids))
            tis = cursor.fetchall()
            cursor.execute("SELECT state, count(*) FROM dag_run WHERE dag_id = %s AND run_id = ANY(%s) GROUP BY 1",
                           (UPGRADE, self.run_ids))
            runs = Counter(dict(cursor.fetchall()))
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                           "application_name <> %s", (MONITOR_NAME,))
            connections = cursor.fetchone()[0]
        now = time.monotonic()
        with self.slow._lock:
            creating = sum(1 for status, until in self.slow.busy_until.values() if status == "creating" and until > now)
        return Sample(now, [(r, t, m) for r, t, m, s, _ in tis if s == "running"],
                      sum(1 for *_, s, _ in tis if s == "deferred"), sum(1 for *_, s, _ in tis if s == "queued"),
                      *(sum(1 for *_, s, pool in tis if s == state and pool == STEP_POOL)
                        for state in ("running", "queued", "scheduled")),
                      runs, connections, creating)

    def _session_ticks(self) -> dict[str, int]:
        """CPU ticks per Airflow component: over every live process of its session, its own and those of its reaped
        children. A task process's ticks move into its supervisor's when it is reaped, so none is lost between
        samples (the scheduler's session holds the LocalExecutor's workers and every task process). Per server of
        the topology (and this bench): the process and its live children (a PostgreSQL server's backends)."""
        names = {pid: name for name, pid in self.leaders.items()}
        servers = {pid: name for name, pid in self.services.items()}
        ticks = dict.fromkeys([*self.leaders, "scheduler_loop", *self.services], 0)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) in names:
                ticks[names[int(fields[3])]] += sum(int(value) for value in fields[11:15])
            elif (server := servers.get(int(pid)) or servers.get(int(fields[1]))) is not None:
                ticks[server] += sum(int(value) for value in fields[11:15])
            if int(pid) == self.leaders["scheduler"]:
                ticks["scheduler_loop"] = sum(int(value) for value in fields[11:13])
        return ticks

    def cpu_seconds(self) -> dict[str, float]:
        """Per component and server, and the whole machine's busy time over the measurement (everything else:
        whatever else ran on the machine)."""
        figures = {name: (self.cpu_last[name] - self.cpu_first[name]) / CLOCK_TICKS for name in self.cpu_first}
        figures["machine_busy"] = (self.machine_last - self.machine_first) / CLOCK_TICKS
        figures["everything_else"] = figures["machine_busy"] - sum(
            v for k, v in figures.items() if k not in ("machine_busy", "scheduler_loop"))
        return {name: round(value, 1) for name, value in figures.items()}


def machine_busy_ticks() -> int:
    first_line = Path("/proc/stat").read_text().split("\n")[0]
    user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = (int(v) for v in first_line.split()[1:])
    return user + nice + system + irq + softirq + steal


# --- one measurement: trigger, wait, figures ----------------------------------------------------------------

def measure(airflow: LocalAirflow, topo: Topology, slow: SlowRds, zone_id: str, sources: list[int],
            args: argparse.Namespace, label: str) -> dict:
    stamp = time.strftime("%H%M%S")
    run_ids = [f"fleet_{label}_{source_id(k)}_{stamp}" for k in sources]
    services = {f"{name}_server" if name.endswith("_pg") else name: pid for name, pid in topo.pids().items() if pid}
    monitor = Monitor(airflow, slow, run_ids, args.sample_interval, {**services, "this_bench": os.getpid()}).start()
    calls_before = len(slow.calls)
    started = time.monotonic()
    for k, run_id in zip(sources, run_ids):
        trigger(airflow, conf(topo, zone_id, k, args), run_id)
    triggered = time.monotonic() - started
    ended: dict[str, tuple[str, float]] = {}
    deadline = started + args.timeout
    states = metadata_connection(airflow)  # the api-server answers slowly under a fleet: run states from the database
    try:
        while len(ended) < len(run_ids) and time.monotonic() < deadline:
            with states.cursor() as cursor:
                cursor.execute("SELECT run_id, state FROM dag_run WHERE dag_id = %s AND run_id = ANY(%s)",
                               (UPGRADE, run_ids))
                for run_id, state in cursor.fetchall():
                    if run_id not in ended and state in ("success", "failed"):
                        ended[run_id] = (state, time.monotonic() - started)
                        print(f"   {label} {run_id}: {state} after {ended[run_id][1]:.1f} s", flush=True)
            time.sleep(1)
    finally:
        states.close()
        monitor.finish()
    wall = max((t for _, t in ended.values()), default=time.monotonic() - started)
    figures = summarize(monitor, run_ids, ended, wall, triggered, args.pool_slots)
    if args.samples_out:
        write_samples(args.samples_out, label, monitor)
    figures["rds_calls"] = dict(Counter(action for _, action in slow.calls[calls_before:]))
    for run_id in run_ids:
        if ended.get(run_id, ("",))[0] != "success":
            figures.setdefault("not_succeeded", {})[run_id] = states_of(airflow, run_id)
    return figures


def write_samples(path: Path, label: str, monitor: Monitor) -> None:
    with path.open("a") as out:
        for s in monitor.samples:
            out.write(json.dumps({
                "label": label, "at_s": round(s.at - monitor.started, 2), "in_step_pool": s.in_step_pool,
                "queued": s.queued_in_step_pool, "scheduled": s.scheduled_in_step_pool, "deferred": s.deferred,
                "creating": s.creating, "running": sorted(t for _, t, _ in s.running)}) + "\n")


def warm_up(airflow: LocalAirflow, body: dict) -> None:
    """A plan of the single source first: the executor's first task starts its forkserver and imports the preload
    (several seconds, once per scheduler start), which a long-running deployment has long done."""
    began = time.monotonic()
    run_id = f"fleet_warm_up_{time.strftime('%H%M%S')}"
    trigger(airflow, {**body, "plan_only": True}, run_id)
    state = airflow.wait_for_run(UPGRADE, run_id, timeout=300, poll_interval=1)
    if state != "success":
        raise RuntimeError(f"the warm-up plan ended {state}")
    print(f"warm-up plan: {state} after {time.monotonic() - began:.1f} s", flush=True)


def trigger(airflow: LocalAirflow, body: dict, run_id: str, attempts: int = 5) -> None:
    """A trigger call that timed out may have created the run: a retry answering 409 means it did."""
    for attempt in range(attempts):
        try:
            airflow.trigger(UPGRADE, body, run_id=run_id)
            return
        except AirflowApiError as error:
            if error.status == 409 and attempt:
                return
            raise
        except OSError as error:  # a timeout of the api-server
            print(f"   trigger {run_id}: {type(error).__name__}, again", flush=True)
    raise RuntimeError(f"could not trigger {run_id}")


def metadata_connection(airflow: LocalAirflow):
    db = airflow.metadata_db
    connection = psycopg2.connect(host=db.host, port=db.port, dbname=db.dbname, user=db.user, password=db.password,
                                  application_name=MONITOR_NAME)
    connection.autocommit = True
    return connection


def summarize(monitor: Monitor, run_ids: list[str], ended: dict, wall: float, triggered: float,
              pool_slots: int) -> dict:
    samples = monitor.samples
    while_creating = [s for s in samples if s.creating]
    peak = max(samples, key=lambda s: len(s.running), default=None)
    peak_creating = max(while_creating, key=lambda s: len(s.running), default=None)
    seconds = monitor.ended - monitor.started
    cpu_by_component = monitor.cpu_seconds()
    cpu = cpu_by_component.get("triggerer", 0.0)
    return {
        "runs": len(run_ids),
        "succeeded": sum(1 for state, _ in ended.values() if state == "success"),
        "wall_s": round(wall, 1),
        "trigger_calls_s": round(triggered, 2),
        "peak_slots": len(peak.running) if peak else None,
        "peak_slots_at_s": round(peak.at - monitor.started, 1) if peak else None,
        "peak_slots_tasks": dict(Counter(t for _, t, _ in peak.running)) if peak else {},
        "peak_slots_while_creating": len(peak_creating.running) if peak_creating else None,
        "peak_while_creating_tasks": dict(Counter(t for _, t, _ in peak_creating.running)) if peak_creating else {},
        "creating_window_s": round(len(while_creating) * monitor.interval, 1),
        "slot_s_while_creating_by_task": slot_seconds(while_creating, monitor.interval),
        "slot_s_by_task": slot_seconds(samples, monitor.interval),
        "idle_pool_slot_s": idle_pool_slot_seconds(samples, monitor.interval, pool_slots),
        "peak_deferred": max((s.deferred for s in samples), default=0),
        "peak_queued": max((s.queued for s in samples), default=0),
        "peak_runs_running": max((s.runs.get("running", 0) for s in samples), default=0),
        "peak_runs_queued": max((s.runs.get("queued", 0) for s in samples), default=0),
        "triggerer_cpu_s": cpu,
        "triggerer_cpu_pct_of_core": round(100 * cpu / seconds, 1) if seconds else None,
        "metadata_db_connections_peak": max((s.connections for s in samples), default=0),
        "cpu_s": cpu_by_component,
        "cpu_s_per_upgrade": round(cpu_by_component["machine_busy"] / len(run_ids), 1),
        "retried_tasks": monitor.retried,
        "samples": len(samples),
    }


def idle_pool_slot_seconds(samples: list[Sample], interval: float, pool_slots: int) -> dict[str, float]:
    """Slot-seconds of the steps' pool not computing: held by queued tasks (the executor starting them), free while
    a task was ready (the scheduler behind), free while tasks were deferred only (waiting for RDS, sync, a settle),
    or free with nothing left to do."""
    idle: Counter[str] = Counter()
    for s in samples if pool_slots else []:
        idle["queued"] += s.queued_in_step_pool
        free = max(0, pool_slots - s.in_step_pool - s.queued_in_step_pool)
        why = "free_while_ready" if s.scheduled_in_step_pool else "free_while_deferred" if s.deferred else "free_idle"
        idle[why] += free
    return {why: round(n * interval, 1) for why, n in idle.items()}


def slot_seconds(samples: list[Sample], interval: float) -> dict[str, float]:
    counts = Counter(task for s in samples for _, task, _ in s.running)
    return {task: round(n * interval, 1) for task, n in counts.most_common()}


def states_of(airflow: LocalAirflow, run_id: str) -> dict[str, str | None]:
    try:
        tis = airflow.task_instances(UPGRADE, run_id)
    except (AirflowApiError, OSError) as error:
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {ti["task_id"] + ("" if ti.get("map_index", -1) == -1 else f"[{ti['map_index']}]"): ti["state"]
            for ti in tis if ti["state"] != "success"}


def describe(label: str, figures: dict) -> str:
    keys = ("runs", "succeeded", "wall_s", "peak_slots", "peak_slots_while_creating", "peak_deferred",
            "peak_runs_running", "peak_runs_queued", "triggerer_cpu_s", "triggerer_cpu_pct_of_core",
            "metadata_db_connections_peak", "cpu_s_per_upgrade")
    return (f"{label}: " + " ".join(f"{k}={figures[k]}" for k in keys)
            + f"\n   peak slots {figures['peak_slots_tasks']} at {figures['peak_slots_at_s']} s; while creating "
              f"{figures['peak_while_creating_tasks']} (creating window {figures['creating_window_s']} s)"
            + f"\n   slot-seconds while creating: {figures['slot_s_while_creating_by_task']}"
            + f"\n   slot-seconds by task: {figures['slot_s_by_task']}"
            + f"\n   free slot-seconds of the steps' pool: {figures['idle_pool_slot_s']}"
            + f"\n   CPU seconds: {figures['cpu_s']}"
            + f"\n   tasks retried: {figures['retried_tasks']}"
            + (f"\n   NOT SUCCEEDED: {figures['not_succeeded']}" if figures.get("not_succeeded") else ""))


# --- main ----------------------------------------------------------------------------------------------------

def local_airflow(topo: Topology, env: dict[str, str], metadata_db, pool_slots: int, preload: bool,
                  runs_per_loop: int, idle_sleep: float) -> LocalAirflow:
    if pool_slots:
        env = {**env, "PGACTIVE_UPGRADE_POOL": STEP_POOL}
    if preload:
        env = {**env, **FLEET_SETTINGS}
    if runs_per_loop:
        env = {**env, "AIRFLOW__SCHEDULER__MAX_DAGRUNS_PER_LOOP_TO_SCHEDULE": str(runs_per_loop)}
    if idle_sleep:
        env = {**env, "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": str(idle_sleep)}
    return LocalAirflow(
        home=topo.state_dir / "airflow",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        port=topo.ports.airflow_api,
        extra_env={**env, **AIRFLOW_SETTINGS, "PGU_PG_BIN_DIRS": str(topo.new_pg.bin_dir)},
        python_paths=[REPO / "include", REPO],
        metadata_db=metadata_db,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="upgrades at once")
    parser.add_argument("--create-seconds", type=float, default=60, help="a new instance stays `creating` this long")
    parser.add_argument("--reboot-seconds", type=float, default=10, help="a rebooted instance stays `rebooting`")
    parser.add_argument("--settle-seconds", type=int, default=5, help="the upgrades' phase_settle_seconds")
    parser.add_argument("--rds-poll-seconds", type=int, default=5, help="the upgrades' rds_poll_seconds")
    parser.add_argument("--rows", type=int, default=5000, help="seed rows per source database")
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds for all runs of one measurement")
    parser.add_argument("--skip-single", action="store_true", help="no single upgrade first (no ratio)")
    parser.add_argument("--pool-slots", type=int, default=4,
                        help="the upgrade steps' own pool (README: a fleet on one Airflow); 0: default_pool")
    parser.add_argument("--runs-per-loop", type=int, default=4,
                        help="runs the scheduler examines per loop, as README recommends for a fleet (0: Airflow's 20)")
    parser.add_argument("--idle-sleep", type=float, default=0,
                        help="seconds the scheduler sleeps after a loop that queued nothing (0: Airflow's 1 s)")
    parser.add_argument("--no-preload", dest="preload", action="store_false",
                        help="task processes import every module and parse AWS data themselves (no FLEET_SETTINGS)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="no bytecode compiled for include/, dags/ and plugins/ beforehand (as an image build does)")
    parser.add_argument("--keep-up", action="store_true", help="leave Airflow and the topology running at the end")
    parser.add_argument("--samples-out", type=Path, help="write every sample of each measurement here, one JSON a line")
    args = parser.parse_args(argv)

    single = [] if args.skip_single else [0]
    fleet = list(range(1, args.n + 1))
    topo = Topology(STATE_DIR, Ports.from_base(PORT_BASE), server_settings=FLEET_SERVER_SETTINGS)
    LocalAirflow(home=topo.state_dir / "airflow", dags_folder=REPO / "dags", plugins_folder=REPO / "plugins",
                 port=topo.ports.airflow_api).stop()  # an earlier --keep-up: it lives in the state dir reset below
    topo.reset()
    airflow = None
    results: dict[str, dict] = {}
    try:
        began = time.monotonic()
        topo.up()
        metadata_db = provision_metadata_db(topo.new_pg, topo.state_dir)
        for k in single + fleet:
            seed_source(topo, k, args.rows)
            aws.seed_aws(topo.moto_url, source_id(k), topo.credentials["postgres"])
        zone_id = seed_routes(topo, single + fleet)
        print(f"topology and {len(single + fleet)} sources seeded in {time.monotonic() - began:.1f} s", flush=True)
        with SlowRds(topo.moto_url, create_seconds=args.create_seconds, reboot_seconds=args.reboot_seconds,
                     port=SLOW_RDS_PORT) as slow:
            airflow = local_airflow(topo, connections_env(topo, slow, single + fleet), metadata_db, args.pool_slots,
                                    args.preload, args.runs_per_loop, args.idle_sleep)
            if args.compile:
                compile_bytecode(REPO)
            started = time.monotonic()
            airflow.start(timeout=300)
            if args.pool_slots:
                airflow.api("POST", "pools", {"name": STEP_POOL, "slots": args.pool_slots, "include_deferred": False,
                                              "description": "upgrade steps computing at once"})
            airflow.wait_for_dag(UPGRADE)
            max_active_runs = airflow.api("GET", f"dags/{UPGRADE}/details").get("max_active_runs")
            print(f"Airflow up at {airflow.url} after {time.monotonic() - started:.1f} s "
                  f"(DAG max_active_runs {max_active_runs})", flush=True)
            warm_up(airflow, conf(topo, zone_id, (single or fleet)[0], args))
            if single:
                results["single"] = measure(airflow, topo, slow, zone_id, single, args, "single")
                print(describe("single", results["single"]), flush=True)
            results["fleet"] = measure(airflow, topo, slow, zone_id, fleet, args, "fleet")
            print(describe(f"fleet of {args.n}", results["fleet"]), flush=True)
    finally:
        if not args.keep_up:
            if airflow is not None:
                airflow.stop()
            topo.down()
    print(json.dumps(summary(args, results, max_active_runs)), flush=True)
    ok = all(r["succeeded"] == r["runs"] for r in results.values())
    return 0 if ok else 1


def summary(args: argparse.Namespace, results: dict[str, dict], max_active_runs) -> dict:
    fleet, single = results.get("fleet", {}), results.get("single", {})
    ratio = round(fleet["wall_s"] / single["wall_s"], 2) if fleet and single else None
    creating_peak = fleet.get("peak_slots_while_creating")
    return {
        "n": args.n,
        "wall_s": fleet.get("wall_s"),
        "single_wall_s": single.get("wall_s"),
        "wall_ratio": ratio,
        "succeeded": fleet.get("succeeded"),
        "peak_slots": fleet.get("peak_slots"),
        "peak_slots_while_creating": creating_peak,
        "peak_while_creating_tasks": fleet.get("peak_while_creating_tasks"),
        "slot_s_while_creating_by_task": fleet.get("slot_s_while_creating_by_task"),
        "idle_pool_slot_s": fleet.get("idle_pool_slot_s"),
        "peak_deferred": fleet.get("peak_deferred"),
        "peak_runs_running": fleet.get("peak_runs_running"),
        "retried_tasks": fleet.get("retried_tasks"),
        "dag_max_active_runs": max_active_runs,
        "pool_slots": args.pool_slots or None,
        "preload": FLEET_SETTINGS if args.preload else None,
        "scheduler_runs_per_loop": args.runs_per_loop or 20,
        "scheduler_idle_sleep_s": args.idle_sleep or 1.0,
        "bytecode_compiled": args.compile,
        "cpu_s": fleet.get("cpu_s"),
        "cpu_s_per_upgrade": fleet.get("cpu_s_per_upgrade"),
        "triggerer_cpu_s": fleet.get("triggerer_cpu_s"),
        "triggerer_cpu_pct_of_core": fleet.get("triggerer_cpu_pct_of_core"),
        "metadata_db_connections_peak": fleet.get("metadata_db_connections_peak"),
        "single": {k: single.get(k) for k in ("wall_s", "peak_slots", "peak_slots_while_creating", "triggerer_cpu_s",
                                              "triggerer_cpu_pct_of_core", "metadata_db_connections_peak")},
        "targets": {"slots_while_creating_at_most_4": creating_peak is not None and creating_peak <= 4,
                    "wall_under_2x_single": ratio is not None and ratio < 2},
        "create_seconds": args.create_seconds,
        "reboot_seconds": args.reboot_seconds,
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    sys.exit(main())
