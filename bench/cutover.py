"""Cutover under a write load: the DAG's cutover task versus a minimal hand-written cutover.

Each run measures both on a freshly seeded local topology (PostgreSQL 15 -> 17 native replication built by the
domain steps, HAProxy in front). Client processes write through HAProxy's write port as role `app`, one INSERT
per transaction, and log every commit; afterwards every logged commit is looked up on the target.

    PYTHONPATH=include:. .venv/bin/python bench/cutover.py --runs 10

The last line printed is one JSON object with the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field

import psycopg2
import structlog

from pgactive_upgrade import config
from pgactive_upgrade.db import Credentials
from pgactive_upgrade.upgrade import Upgrade
from topology import Ports, Topology
from topology.demo import demo_conf
from topology.load import BENCH_TABLE_DDL, IN_DOUBT, INSERT, OK, Load

STATE_DIR = ".local/bench"
PORT_BASE = 21400
DATABASE = "app"
APP_ROLE = "app"
MARKER_CLIENT = -1  # hand-written cutover's marker rows live in bench_log under this client id


# --- topology and the domain's setup steps --------------------------------------------------------------------

def fresh(topo: Topology) -> None:
    topo.seed_database(rows=2000)
    topo.reset_aws()
    topo.seed_aws()
    topo.haproxy.reset_weights()
    with topo.old_pg.connect("postgres", dbname=DATABASE) as connection, connection.cursor() as cursor:
        cursor.execute(f"SET ROLE {APP_ROLE}")  # owned by app, so the seed's default privileges grant replicator SELECT
        cursor.execute(BENCH_TABLE_DDL)
        cursor.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.bench_log'::regclass "
                       "AND array_to_string(attoptions, ',') LIKE '%pg_attver=%'")
        stamped = cursor.fetchone()[0]
    connection.close()
    if stamped:
        raise SystemExit(
            "the source server stamps new columns with the attribute option pg_attver (Debian PostgreSQL 15.20); "
            "pg_dump 17 copies it and PostgreSQL 17 refuses it, so build_group's schema copy fails. Run the bench "
            "with PGU_OLD_PG_BIN pointing at a 15.19 server (see bench/README.md) after removing .local/bench."
        )


def replicating_upgrade(topo: Topology, lag_timeout: float = 60) -> Upgrade:
    upgrade = Upgrade(
        config.validate(demo_conf(topo)),
        topo.aws_client("rds"),
        Credentials("postgres", topo.credentials["postgres"]),
        Credentials("replicator", topo.credentials["replicator"]),
        probe=Credentials("prober", topo.credentials["prober"]),
        dbname=DATABASE,
    )
    for step in (upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters, upgrade.install,
                 upgrade.build_group):
        step()
    deadline = time.monotonic() + lag_timeout
    while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"replication did not catch up within {lag_timeout} s: {upgrade.lag()}")
        time.sleep(0.2)
    return upgrade


def app_dsn(topo: Topology) -> str:
    password = topo.credentials[APP_ROLE]
    return (f"host=127.0.0.1 port={topo.ports.haproxy_write} dbname={DATABASE} user={APP_ROLE} "
            f"password={password} connect_timeout=2 application_name=bench_load")


# --- the hand-written cutover: plain SQL and the HAProxy runtime API, no project code ---------------------------

def handwritten_cutover(topo: Topology, marker_seq: int, reverse_slot: bool = False, poll_seconds: float = 0.005,
                        deadline_s: float = 30) -> dict:
    source = psycopg2.connect(topo.old_pg.dsn("postgres", DATABASE))
    target = psycopg2.connect(topo.new_pg.dsn("postgres", DATABASE))
    source.autocommit = target.autocommit = True
    steps: dict[str, float] = {}
    try:
        started = mark = time.monotonic()

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            steps[name] = round((now - mark) * 1000, 1)
            mark = now

        with source.cursor() as s, target.cursor() as t:
            # The same fence as the package's: no login, sessions ended and waited for, then proven gone.
            s.execute(f"ALTER ROLE {APP_ROLE} NOLOGIN")
            s.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                      "AND usename = %s", (DATABASE, APP_ROLE))
            while True:  # until every ended backend has exited
                s.execute("SELECT pg_stat_clear_snapshot(); SELECT count(*) FROM pg_stat_activity "
                          "WHERE datname = %s AND usename = %s", (DATABASE, APP_ROLE))
                if s.fetchone()[0] == 0:
                    break
                time.sleep(poll_seconds)
            step("fence")
            s.execute(INSERT, (MARKER_CLIENT, marker_seq))
            step("marker_written")
            while True:
                t.execute("SELECT 1 FROM public.bench_log WHERE client = %s AND seq = %s", (MARKER_CLIENT, marker_seq))
                if t.fetchone():
                    break
                if time.monotonic() - started > deadline_s:
                    raise RuntimeError("hand-written cutover: marker never reached the target")
                time.sleep(poll_seconds)
            step("caught_up")
            s.execute("SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences "
                      "WHERE last_value IS NOT NULL")
            for name, value in s.fetchall():
                t.execute("SELECT setval(%s::regclass, %s)", (name, value))
            step("sequences")
            if reverse_slot:  # what a rollback-capable cutover must add inside the fence
                t.execute("SELECT pg_create_logical_replication_slot('bench_rev', 'pgoutput')")
                step("reverse_slot")
            # The target was fenced by build_group; unfence it before new connections land there.
            t.execute(f"ALTER ROLE {APP_ROLE} IN DATABASE {DATABASE} RESET default_transaction_read_only")
            step("target_unfenced")
            haproxy_commands(topo.haproxy.runtime_api, [
                "set weight pg_write/target 100", "set weight pg_write/source 0",
                "set weight pg_read/target 100", "set weight pg_read/source 0",
                "shutdown sessions server pg_write/source", "shutdown sessions server pg_read/source",
            ])
            step("switched")
            unavailable_ms = round((time.monotonic() - started) * 1000, 1)
        return {"write_unavailable_ms": unavailable_ms, "total_ms": round((time.monotonic() - started) * 1000, 1),
                "steps_ms": steps}
    finally:
        source.close()
        target.close()


def haproxy_commands(runtime_api: str, commands: list[str]) -> None:
    host, port = runtime_api.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(("; ".join(commands) + "\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if answer.strip():
        raise RuntimeError(f"HAProxy runtime API answered: {answer.decode(errors='replace').strip()}")


# --- one measurement ------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    kind: str
    writes_per_s: float
    max_gap_ms: float
    baseline_gap_ms: float
    committed: int
    lost: int
    duplicated: int
    phantom: int
    in_doubt: int
    in_doubt_present: int
    client_errors: int
    error_kinds: dict
    write_unavailable_ms: float
    cutover_ms: float
    steps_ms: dict
    extra: dict = field(default_factory=dict)


def measure(topo: Topology, kind: str, run: int, args) -> Measurement:
    fresh(topo)
    upgrade = replicating_upgrade(topo)
    load = Load(app_dsn(topo), args.clients, args.rate_per_client, max_seconds=args.warmup + args.after + 120)
    load.start()
    try:
        time.sleep(args.warmup)
        began = time.monotonic()
        if kind == "ours":
            result = upgrade.cutover(f"bench__run{run}#1")  # the body of CutoverOperator.step
        else:
            result = handwritten_cutover(topo, marker_seq=run, reverse_slot=args.handwritten_reverse_slot)
        ended = time.monotonic()
        time.sleep(args.after)
    finally:
        logs = load.stop()
    measurement = evaluate(topo, kind, logs, load, began, ended, result)
    if kind == "ours":
        measurement.extra.update(reverse_and_verify(topo, upgrade))
    return measurement


def evaluate(topo: Topology, kind: str, logs: dict[int, dict], load: Load, began: float, ended: float,
             result: dict) -> Measurement:
    ok = {(c, seq) for c, r in logs.items() for seq, _, status in r["log"] if status == OK}
    doubt = {(c, seq) for c, r in logs.items() for seq, _, status in r["log"] if status == IN_DOUBT}
    on_target, duplicated = rows_on(topo.new_pg)
    times = sorted(t for r in logs.values() for _, t, status in r["log"] if status == OK)
    error_kinds: dict[str, int] = {}
    for r in logs.values():
        for key, count in r["error_kinds"].items():
            error_kinds[key] = error_kinds.get(key, 0) + count
    return Measurement(
        kind=kind,
        writes_per_s=round(len(times) / (load.stopped_at - load.started_at), 1),
        max_gap_ms=round(longest_gap(times, began, ended) * 1000, 1),
        baseline_gap_ms=round(longest_gap(times, load.started_at + 0.5, began - 0.05) * 1000, 1),
        committed=len(ok),
        lost=len(ok - on_target),
        duplicated=duplicated,
        phantom=len(on_target - ok - doubt),
        in_doubt=len(doubt),
        in_doubt_present=len(doubt & on_target),
        client_errors=sum(r["errors"] for r in logs.values()),
        error_kinds=error_kinds,
        write_unavailable_ms=result.get("write_unavailable_ms"),
        cutover_ms=round((ended - began) * 1000, 1),
        steps_ms=result.get("steps_ms", {}),
    )


def rows_on(server) -> tuple[set, int]:
    with server.connect("postgres", dbname=DATABASE) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT client, seq FROM public.bench_log WHERE client >= 0")
        rows = cursor.fetchall()
        cursor.execute("SELECT count(*) FROM (SELECT 1 FROM public.bench_log GROUP BY client, seq HAVING count(*) > 1) d")
        duplicated = cursor.fetchone()[0]
    connection.close()
    return set(rows), duplicated


def server_version(server) -> str:
    connection = server.connect("postgres")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            return cursor.fetchone()[0]
    finally:
        connection.close()


def longest_gap(times: list[float], start: float, end: float) -> float:
    """Longest interval between consecutive commits (all clients merged) that overlaps [start, end]."""
    gaps = [b - a for a, b in zip(times, times[1:]) if b >= start and a <= end]
    return max(gaps, default=0.0)


def reverse_and_verify(topo: Topology, upgrade: Upgrade, timeout: float = 15) -> dict:
    """After our cutover the reverse replication must bring every target row back to the source (rollback safety)."""
    deadline = time.monotonic() + timeout
    while True:
        on_target, _ = rows_on(topo.new_pg)
        on_source, _ = rows_on(topo.old_pg)
        missing = len(on_target - on_source)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    try:
        upgrade.verify()
        verified = "ok"
    except Exception as error:
        verified = f"failed: {str(error)[:300]}"
    return {"reverse_missing_on_source": missing, "verify": verified}


# --- summary --------------------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1)} if values else {}


def summary(runs: list[dict[str, Measurement]], source_version: str) -> dict:
    ours = [r["ours"] for r in runs]
    hand = [r["handwritten"] for r in runs]
    ratios = [o.max_gap_ms / h.max_gap_ms for o, h in zip(ours, hand) if h.max_gap_ms > 0]
    everything = ours + hand
    return {
        "runs": len(runs),
        "source_version": source_version,
        "writes_per_s": {"median": round(statistics.median(m.writes_per_s for m in everything), 1),
                         "min": min(m.writes_per_s for m in everything)},
        "max_gap_ms": spread([m.max_gap_ms for m in ours]),
        "handwritten_max_gap_ms": spread([m.max_gap_ms for m in hand]),
        "gap_ratio": round(statistics.median(ratios), 2) if ratios else None,
        "lost": sum(m.lost for m in ours),
        "duplicated": sum(m.duplicated for m in ours),
        "phantom": sum(m.phantom for m in ours),
        "in_doubt": sum(m.in_doubt for m in ours),
        "in_doubt_present_on_target": sum(m.in_doubt_present for m in ours),
        "client_errors": sum(m.client_errors for m in ours),
        "write_unavailable_ms": spread([m.write_unavailable_ms for m in ours]),
        "reverse_missing_on_source": sum(m.extra.get("reverse_missing_on_source", 0) for m in ours),
        "verify_failures": sum(1 for m in ours if m.extra.get("verify") != "ok"),
        "handwritten": {
            "lost": sum(m.lost for m in hand), "duplicated": sum(m.duplicated for m in hand),
            "phantom": sum(m.phantom for m in hand), "in_doubt": sum(m.in_doubt for m in hand),
            "client_errors": sum(m.client_errors for m in hand),
            "write_unavailable_ms": spread([m.write_unavailable_ms for m in hand]),
        },
    }


def describe(run: int, m: Measurement) -> str:
    steps = " ".join(f"{k}={v}" for k, v in m.steps_ms.items())
    extra = " ".join(f"{k}={v}" for k, v in m.extra.items())
    return (f"run {run:2d} {m.kind:<11} gap {m.max_gap_ms:6.1f} ms (baseline {m.baseline_gap_ms:5.1f})  "
            f"unavailable {m.write_unavailable_ms} ms  call {m.cutover_ms} ms  {m.writes_per_s} w/s  "
            f"commits {m.committed}  lost {m.lost}  dup {m.duplicated}  phantom {m.phantom}  "
            f"in-doubt {m.in_doubt} (on target {m.in_doubt_present})  errors {m.client_errors} {m.error_kinds}\n"
            f"       steps_ms: {steps}{'  ' + extra if extra else ''}")


def quiet_events(verbose: bool) -> None:
    if not verbose:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate-per-client", type=float, default=100.0, help="writes/s per client (default 100)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the cutover")
    parser.add_argument("--after", type=float, default=2.0, help="seconds of load on the target after the cutover")
    parser.add_argument("--handwritten-reverse-slot", action="store_true",
                        help="the hand-written cutover also creates a reverse replication slot inside the fence")
    parser.add_argument("--keep-up", action="store_true", help="leave the bench topology running at the end")
    parser.add_argument("--verbose", action="store_true", help="show the domain's event lines")
    args = parser.parse_args(argv)
    quiet_events(args.verbose)

    topo = Topology(STATE_DIR, Ports.from_base(PORT_BASE))
    os.environ["PGU_PG_BIN_DIRS"] = str(topo.new_pg.bin_dir)
    runs: list[dict[str, Measurement]] = []
    try:
        topo.up()
        source_version = server_version(topo.old_pg)
        for run in range(1, args.runs + 1):
            order = ("ours", "handwritten") if run % 2 else ("handwritten", "ours")
            measured = {kind: measure(topo, kind, run, args) for kind in order}
            for kind in ("ours", "handwritten"):
                print(describe(run, measured[kind]), flush=True)
            ratio = measured["ours"].max_gap_ms / measured["handwritten"].max_gap_ms if measured["handwritten"].max_gap_ms else None
            print(f"       gap ratio ours/handwritten: {ratio:.2f}" if ratio else "       gap ratio: n/a", flush=True)
            runs.append(measured)
    finally:
        if not args.keep_up:
            topo.down()
    result = summary(runs, source_version)
    print(json.dumps(result), flush=True)
    return 1 if result["lost"] or result["duplicated"] or result["handwritten"]["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
