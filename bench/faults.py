"""The fault-injection matrix: the cutover and the rollback after cutover killed with SIGKILL at every step boundary
under a write load, each followed by every documented recovery (the watchdog's settle, the rollback DAG's
rollback, a cleared task's re-run). See topology/faults.py for what one case does and measures.

    PYTHONPATH=include:. .venv/bin/python bench/faults.py            # the whole matrix, about 6 minutes
    PYTHONPATH=include:. .venv/bin/python bench/faults.py --quick    # one recovery per kill point

It runs on its own topology (.local/bench-faults, ports 22400+; with --driver pgactive .local/bench-faults-pgactive,
ports 23400+) and prints one line per case, then one JSON object:
per case lost, duplicated, two_writers_seen and outage_s, and the totals. Exit code 1 when any case lost or
duplicated a commit, saw two writable nodes, or stayed without writes for 30 s or more.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import structlog

from pgactive_upgrade import config
from pgactive_upgrade.db import Credentials
from pgactive_upgrade.upgrade import Upgrade
from topology import Ports, Topology, faults
from topology.demo import demo_conf

STATE_DIR, PORT_BASE = ".local/bench-faults", 22400


def replicating(topo: Topology) -> tuple[dict, Upgrade]:
    topo.seed_database(rows=2000)
    topo.reset_aws()
    topo.seed_aws()
    topo.haproxy.reset_weights()
    faults.add_bench_table(topo)
    conf = {**demo_conf(topo), "cutover_deadline_seconds": 10}
    upgrade = Upgrade(config.validate(conf), topo.aws_client("rds"), Credentials("postgres", topo.credentials["postgres"]),
                      Credentials("replicator", topo.credentials["replicator"]),
                   probe=Credentials("prober", topo.credentials["prober"]), dbname="app")
    for step in (upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters, upgrade.install,
                 upgrade.build_group):
        step()
    deadline = time.monotonic() + 60
    while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"replication did not catch up: {upgrade.lag()}")
        time.sleep(0.2)
    return conf, upgrade


def cases(quick: bool, driver: str) -> list[tuple[str, str, str]]:
    matrix = []
    switches = [("cutover", faults.CUTOVER_KILL_POINTS)]
    if driver == "native":  # with pgactive a rollback only moves the routes: it has no fenced switch to kill
        switches.append(("rollback", faults.ROLLBACK_KILL_POINTS))
    for action, points in switches:
        for index, point in enumerate(points):
            recoveries = [faults.RECOVERIES[index % len(faults.RECOVERIES)]] if quick else list(faults.RECOVERIES)
            matrix += [(action, point, recovery) for recovery in recoveries]
    return matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one recovery per kill point instead of all three")
    parser.add_argument("--keep-up", action="store_true", help="leave the bench topology running")
    parser.add_argument("--kill-at", nargs="+", default=None, help="only these kill points")
    parser.add_argument("--driver", choices=("native", "pgactive"), default="native",
                        help="pgactive: PGU_OLD_PG_BIN / PGU_NEW_PG_BIN must name pgactive-enabled bin dirs")
    args = parser.parse_args(argv)
    os.environ["PGU_DRIVER"] = args.driver  # demo_conf's replication_driver
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    os.environ.setdefault("PGU_PG_BIN_DIRS", str(Path(".local/pg17/bin").resolve()))
    pgactive = args.driver == "pgactive"  # its own servers, started with pgactive loaded
    topo = Topology(state_dir=Path(STATE_DIR + ("-pgactive" if pgactive else "")),
                    ports=Ports.from_base(PORT_BASE + (1000 if pgactive else 0)))
    topo.up()
    os.environ["PGU_PG_BIN_DIRS"] = str(topo.new_pg.bin_dir)
    results = []
    try:
        if args.driver == "pgactive" and not (topo.old_pg.pgactive and topo.new_pg.pgactive):
            raise SystemExit("--driver pgactive: the servers have no pgactive; set PGU_OLD_PG_BIN and PGU_NEW_PG_BIN")
        for action, point, recovery in cases(args.quick, args.driver):
            if args.kill_at and point not in args.kill_at:
                continue
            try:
                conf, upgrade = replicating(topo)
            except Exception as error:  # pgactive's workers can outlive a dropped database: restart the servers
                print(f"setup failed ({type(error).__name__}: {str(error)[:120]}); restarting the servers", flush=True)
                for server in (topo.old_pg, topo.new_pg):
                    server.stop()
                    server.ensure_running()
                conf, upgrade = replicating(topo)
            outcome = faults.run_case(topo, conf, upgrade, action, point, recovery)
            results.append(outcome.as_dict())
            print(f"{action:8} killed at {point:17} then {recovery:8}: writer={outcome.writer} lost={outcome.lost} "
                  f"duplicated={outcome.duplicated} two_writers={outcome.two_writers_seen} outage={outcome.outage_s}s "
                  f"acked={outcome.acked} {'; '.join(outcome.notes)}", flush=True)
    finally:
        if not args.keep_up:
            topo.down()
    # Active-active: both nodes take writes by design while they replicate; two writers is not a fault there.
    two_writers_count = args.driver == "native"
    bad = [r for r in results if r["lost"] or r["duplicated"] or (two_writers_count and r["two_writers_seen"])
           or r["outage_s"] >= 30 or not r["killed"] or r["writer"] is None]
    summary = {
        "driver": args.driver,
        "cases": len(results),
        "failed_cases": len(bad),
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "two_writers_seen": sum(r["two_writers_seen"] for r in results),
        "max_outage_s": max((r["outage_s"] for r in results), default=None),
        "results": [{k: r[k] for k in ("action", "kill_at", "recovery", "writer", "lost", "duplicated",
                                       "two_writers_seen", "outage_s")} for r in results],
    }
    print(json.dumps(summary))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
