"""`make demo`: a fresh local topology, a local Airflow, one upgrade triggered through the REST API.

`python -m topology.demo up` runs it; `python -m topology.demo down` stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import psycopg2

from topology import Ports, Topology
from topology.airflow_local import LocalAirflow

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".local" / "demo"
PORTS = Ports.from_base(int(os.environ.get("PGU_DEMO_PORT_BASE", "25400")))
DAG_ID = "pgactive_rolling_upgrade"
SOURCE, TARGET = "orders-db", "orders-db-pg17"


def demo_conf(topo: Topology) -> dict:
    return {
        "source_instance": SOURCE,
        "target_engine_version": "17.2",
        "replication_driver": os.environ.get("PGU_DRIVER") or "native",
        "exclude_schemas": ["scratch"],
        "shift_percentages": [25, 50, 100],
        "phase_settle_seconds": 2,
        "rds_poll_seconds": 1,  # moto answers at once
        "lag_threshold_bytes": 65536,
        "cutover_deadline_seconds": 30,
        "traffic": {
            "controller": "haproxy",
            "haproxy": {
                "runtime_api": topo.haproxy.runtime_api,
                "routes": [{"name": "pg_write", "carries_writes": True}, {"name": "pg_read", "carries_writes": False}],
                "source_server": "source",
                "target_server": "target",
            },
        },
        "allow_source_reboot": True,  # moto's source runs a default parameter group without logical replication
        "decommission": "delete",
        "endpoint_overrides": topo.endpoint_overrides(SOURCE, TARGET),
    }


def local_airflow(topo: Topology) -> LocalAirflow:
    env = {
        **topo.airflow_connections_env(),
        "PGU_PG_BIN_DIRS": str(topo.new_pg.bin_dir),
    }
    return LocalAirflow(
        home=STATE / "airflow",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        port=PORTS.airflow_api,
        extra_env=env,
        python_paths=[REPO / "include", REPO],
    )


def up() -> int:
    started = time.monotonic()
    topo = Topology(STATE, PORTS)
    say("Starting the local topology (PostgreSQL 15 and 17, moto, HAProxy) ...")
    local_airflow_without_topology().stop()  # it holds the old credentials and lives in the state dir reset below
    topo.reset()
    topo.up()
    topo.seed_database(rows=20000)
    topo.seed_aws(source_instance_id=SOURCE)
    say(f"  old PostgreSQL {topo.old_pg.port}, new PostgreSQL {topo.new_pg.port}, moto {topo.moto_url}, "
        f"HAProxy write :{topo.haproxy.write_port} read :{topo.haproxy.read_port}")
    airflow = local_airflow(topo)
    say("Starting Airflow (api-server, scheduler, triggerer, dag-processor) ...")
    airflow.start()
    airflow.wait_for_dag(DAG_ID)
    run_id = f"demo__{datetime.now():%Y%m%dT%H%M%S}"
    airflow.trigger(DAG_ID, demo_conf(topo), run_id=run_id)
    say(f"Triggered {DAG_ID} run {run_id} through the REST API; progress:")
    printer, gates = ProgressPrinter(), GateAnswerer(airflow, run_id)
    state = airflow.wait_for_run(DAG_ID, run_id, timeout=1200, on_poll=lambda tis: (printer(tis), gates(tis)))
    summary = summarize(airflow, topo, run_id, state)
    print(json.dumps(summary, indent=2))
    say(f"\nRun {state} in {time.monotonic() - started:.0f} s (demo total).")
    say(f"Airflow UI: {airflow.url}  login: {airflow.username} / {airflow.password}")
    say("Stop everything with: make down")
    return 0 if state == "success" else 1


class ProgressPrinter:
    def __init__(self):
        self.seen: dict[str, str] = {}

    def __call__(self, task_instances: list[dict]) -> None:
        for ti in sorted(task_instances, key=lambda t: t.get("start_date") or "9"):
            key = ti["task_id"] + ("" if ti.get("map_index", -1) == -1 else f"[{ti['map_index']}]")
            state = ti.get("state") or "none"
            if self.seen.get(key) != state and state not in ("none", "scheduled", "queued"):
                self.seen[key] = state
                duration = ti.get("duration")
                took = f" ({duration:.1f} s)" if duration else ""
                say(f"  {datetime.now():%H:%M:%S}  {key:<45} {state}{took}")


class GateAnswerer:
    """Approves each approval gate the run asks (decommission: delete asks before deleting the old instance) through
    the REST API, as an operator would from the UI's Required Actions; any other gate is left to a person."""

    def __init__(self, airflow: LocalAirflow, run_id: str):
        self.airflow, self.run_id, self.answered = airflow, run_id, set()

    def __call__(self, task_instances: list[dict]) -> None:
        for ti in task_instances:
            key = (ti["task_id"], ti.get("map_index", -1))
            if ti.get("state") != "awaiting_input" or not key[0].startswith("approve_") or key in self.answered:
                continue
            time.sleep(3)  # not before the gate's first process exited: an instant answer races Airflow (README)
            self.airflow.api("PATCH", f"dags/{DAG_ID}/dagRuns/{self.run_id}/taskInstances/{key[0]}/{key[1]}/hitlDetails",
                             {"chosen_options": ["Approve"], "params_input": {}})
            self.answered.add(key)
            say(f"  {datetime.now():%H:%M:%S}  {key[0]:<45} approved by {self.airflow.username} through the REST API")


def summarize(airflow: LocalAirflow, topo: Topology, run_id: str, state: str) -> dict:
    steps = {
        ti["task_id"] + ("" if ti.get("map_index", -1) == -1 else f"[{ti['map_index']}]"): round(ti["duration"] or 0, 2)
        for ti in sorted(airflow.task_instances(DAG_ID, run_id), key=lambda t: t.get("start_date") or "")
    }
    verified = xcom(airflow, run_id, "verify") or {}
    cutover = xcom(airflow, run_id, "cutover") or {}
    rds = topo.aws_client("rds")
    source_left = [i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"] if i["DBInstanceIdentifier"] == SOURCE]
    snapshots = [s["DBSnapshotIdentifier"] for s in rds.describe_db_snapshots(DBInstanceIdentifier=SOURCE)["DBSnapshots"]]
    return {
        "run_id": run_id,
        "state": state,
        "step_seconds": steps,
        "rows_verified": verified.get("rows"),
        "tables_verified": verified.get("tables"),
        "sequences_verified": verified.get("sequences"),
        "write_unavailable_ms": cutover.get("write_unavailable_ms"),
        "final_split_on_target_percent": cutover.get("split"),
        "new_connections_through_haproxy_land_on": landing_versions(topo),
        "source_instance_deleted": not source_left,
        "final_snapshots": snapshots,
    }


def landing_versions(topo: Topology, connections: int = 20) -> dict[str, int]:
    """Open fresh connections through HAProxy's write port as the application role; count server versions."""
    seen: dict[str, int] = {}
    for _ in range(connections):
        connection = psycopg2.connect(host="127.0.0.1", port=topo.haproxy.write_port, dbname="app", user="app",
                                      password=topo.credentials["app"], connect_timeout=5)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            version = cursor.fetchone()[0].split()[0]
        connection.close()
        seen[f"PostgreSQL {version}"] = seen.get(f"PostgreSQL {version}", 0) + 1
    return seen


def xcom(airflow: LocalAirflow, run_id: str, task_id: str):
    try:
        entry = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
    except Exception:
        return None
    value = entry.get("value")
    return json.loads(value) if isinstance(value, str) and value.startswith("{") else value


def down() -> int:
    topo = Topology(STATE, PORTS)
    local_airflow_without_topology().stop()
    topo.down()
    say("Stopped the demo's Airflow and topology.")
    return 0


def local_airflow_without_topology() -> LocalAirflow:
    return LocalAirflow(home=STATE / "airflow", dags_folder=REPO / "dags", plugins_folder=REPO / "plugins", port=PORTS.airflow_api)


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topology.demo")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    return up() if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
