"""Verification speed: rows per second of the package's verify against a plain digest of the same table.

On its own topology (`.local/bench-verify`, ports 18400+) it fills `public.bench_rows` (5 million rows by default:
bigint key, int, numeric, text, timestamptz) identically on PostgreSQL 15 and 17, then times, alternately:
- the floor: `SELECT count(*), md5(string_agg(t::text, '' ORDER BY id))` on both nodes at once (two threads);
- ours: `verify.Verification` over the same table (key-ordered chunks, both nodes, `--parallelism` at once).

    PYTHONPATH=include:. .venv/bin/python bench/verify.py --rows 5000000 --runs 3

The last line printed is one JSON object; `ratio` is our rows/s over the floor's (above 1: faster than the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "include"), str(REPO)]

from pgactive_upgrade import verify  # noqa: E402
from pgactive_upgrade.catalog import Table  # noqa: E402
from pgactive_upgrade.db import Credentials, Endpoint  # noqa: E402
from topology import Ports, Topology  # noqa: E402

STATE_DIR = ".local/bench-verify"
PORT_BASE = 18400
DATABASE = "verifybench"
TABLE = Table("public", "bench_rows", ("id",))
FILL = """
CREATE TABLE IF NOT EXISTS public.bench_rows (
    id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(12,2) NOT NULL, note text, at timestamptz NOT NULL);
TRUNCATE public.bench_rows;
INSERT INTO public.bench_rows
SELECT g, g %% 10007, (g %% 100000) / 100.0, md5(g::text), timestamptz '2026-01-01 00:00:00+00' - g * interval '1 second'
FROM generate_series(1, %(rows)s) AS g;
CREATE SCHEMA IF NOT EXISTS pgactive_upgrade;
CREATE TABLE IF NOT EXISTS pgactive_upgrade.cutover_marker (token text PRIMARY KEY, written_at timestamptz DEFAULT now());
"""
FLOOR = "SELECT count(*), md5(string_agg(t::text, '' ORDER BY id)) FROM public.bench_rows AS t"


def admin(server, dbname: str = "postgres"):
    connection = server.connect("postgres", dbname=dbname)
    connection.autocommit = True
    return connection


def prepare(server, rows: int) -> None:
    connection = admin(server)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if not cursor.fetchone():
            cursor.execute(f"CREATE DATABASE {DATABASE}")
    connection.close()
    connection = admin(server, DATABASE)
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('public.bench_rows') IS NOT NULL")
        if cursor.fetchone()[0]:
            cursor.execute("SELECT count(*) FROM public.bench_rows")
            if cursor.fetchone()[0] == rows:
                connection.close()
                return
        cursor.execute(FILL, {"rows": rows})
        cursor.execute("VACUUM ANALYZE public.bench_rows")
    connection.close()


def in_parallel(functions) -> list:
    results = [None] * len(functions)

    def run(index, function):
        try:
            results[index] = function()
        except BaseException as error:  # re-raised in the caller
            results[index] = error

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def floor_once(servers) -> tuple[float, list]:
    def digest(server):
        connection = admin(server, DATABASE)
        with connection.cursor() as cursor:
            cursor.execute(FLOOR)
            result = cursor.fetchone()
        connection.close()
        return result

    started = time.monotonic()
    results = in_parallel([lambda s=s: digest(s) for s in servers])
    return time.monotonic() - started, results


def ours_once(topo: Topology, parallelism: int, chunk_rows: int) -> verify.Report:
    nodes = [verify.VerifyNode("source", Endpoint("127.0.0.1", topo.old_pg.port, DATABASE), writer=True),
             verify.VerifyNode("target", Endpoint("127.0.0.1", topo.new_pg.port, DATABASE), writer=False)]
    credentials = Credentials("postgres", topo.credentials["postgres"])
    return verify.Verification(nodes, credentials, [TABLE], parallelism=parallelism, chunk_rows=chunk_rows).run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--keep-up", action="store_true", help="leave the bench topology running")
    args = parser.parse_args(argv)

    topo = Topology(state_dir=REPO / STATE_DIR, ports=Ports.from_base(PORT_BASE))
    topo.up()
    try:
        started = time.monotonic()
        in_parallel([lambda s=s: prepare(s, args.rows) for s in (topo.old_pg, topo.new_pg)])
        print(f"table ready on both nodes: {args.rows} rows in {time.monotonic() - started:.1f}s", flush=True)
        floor_once((topo.old_pg, topo.new_pg))  # warm both caches once
        floors, ours = [], []
        for run in range(1, args.runs + 1):
            seconds, results = floor_once((topo.old_pg, topo.new_pg))
            if results[0] != results[1]:
                raise SystemExit(f"the floor digests differ: {results}")
            floors.append(seconds)
            report = ours_once(topo, args.parallelism, args.chunk_rows)
            if report.divergences or report.rows != args.rows:
                raise SystemExit(f"verify disagrees: rows {report.rows}, {[d.describe() for d in report.divergences]}")
            ours.append(report.seconds)
            print(f"run {run}: floor {seconds:.2f}s ({args.rows / seconds:,.0f} rows/s), ours {report.seconds:.2f}s "
                  f"({report.rows_per_second:,.0f} rows/s, {report.chunks} chunks)", flush=True)
    finally:
        if not args.keep_up:
            topo.down()
    floor_s, ours_s = statistics.median(floors), statistics.median(ours)
    summary = {
        "rows": args.rows, "runs": args.runs, "parallelism": args.parallelism, "chunk_rows": args.chunk_rows,
        "floor_median_s": round(floor_s, 2), "ours_median_s": round(ours_s, 2),
        "floor_rows_per_s": round(args.rows / floor_s), "ours_rows_per_s": round(args.rows / ours_s),
        "ratio": round(floor_s / ours_s, 2), "cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
