"""A paced write load through HAProxy: client processes, one INSERT per transaction, every commit logged.

A COMMIT that fails after being sent is logged as in-doubt; clients reconnect after any error. Shared by the
benches and the crash-safety tests, which look every logged commit up afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time

import psycopg2
from psycopg2 import sql

OK, IN_DOUBT = "ok", "in_doubt"
BENCH_TABLE_DDL = """
CREATE TABLE public.bench_log (
    client int NOT NULL,
    seq bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (client, seq)
)
"""
INSERT = "INSERT INTO public.bench_log (client, seq, at) VALUES (%s, %s, clock_timestamp())"


# --- load clients (separate processes, so the cutover in the main process does not share their GIL) ------------

def client_main(client_id: int, dsn: str, rate: float, stop, events, max_seconds: float) -> None:
    log: list[tuple[int, float, str]] = []  # (seq, monotonic completion time, OK | IN_DOUBT)
    errors = attempts = seq = 0
    error_kinds: dict[str, int] = {}
    connection = None
    interval = 1.0 / rate
    deadline = time.monotonic() + max_seconds
    next_at = time.monotonic()
    announced = False
    while not stop.is_set() and time.monotonic() < deadline:
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        # Paced, with at most 50 ms of catch-up after a stall.
        next_at = max(next_at + interval, time.monotonic() - 0.05)
        if connection is None:
            try:
                connection = psycopg2.connect(dsn)
            except psycopg2.Error as error:
                errors += 1
                _count(error_kinds, "connect", error)
                continue
            if not announced:
                events.put(("ready", client_id))
                announced = True
        seq += 1
        attempts += 1
        try:
            with connection.cursor() as cursor:
                cursor.execute(INSERT, (client_id, seq))
        except psycopg2.Error as error:  # COMMIT not sent: certainly not committed
            errors += 1
            _count(error_kinds, "insert", error)
            connection = _drop(connection)
            continue
        try:
            connection.commit()
        except psycopg2.Error as error:  # COMMIT sent, answer lost or an error: outcome unknown
            errors += 1
            _count(error_kinds, "commit", error)
            log.append((seq, time.monotonic(), IN_DOUBT))
            connection = _drop(connection)
            continue
        log.append((seq, time.monotonic(), OK))
    _drop(connection)
    events.put(("done", client_id, {"log": log, "errors": errors, "attempts": attempts, "error_kinds": error_kinds}))


def _count(kinds: dict, phase: str, error: Exception) -> None:
    key = f"{phase}:{getattr(error, 'pgcode', None) or type(error).__name__}"
    kinds[key] = kinds.get(key, 0) + 1


def _drop(connection):
    if connection is not None:
        try:
            connection.close()
        except Exception:
            pass
    return None


class Load:
    def __init__(self, dsn: str, clients: int, rate_per_client: float, max_seconds: float):
        self.context = mp.get_context("spawn")
        self.stop_event = self.context.Event()
        self.events = self.context.Queue()
        self.processes = [
            self.context.Process(target=client_main, args=(i, dsn, rate_per_client, self.stop_event, self.events, max_seconds),
                                 daemon=True)
            for i in range(clients)
        ]
        self.started_at = self.stopped_at = 0.0

    def start(self, timeout: float = 30) -> None:
        for process in self.processes:
            process.start()
        ready, deadline = set(), time.monotonic() + timeout
        while len(ready) < len(self.processes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise RuntimeError(f"only {len(ready)} of {len(self.processes)} load clients connected")
            kind, client_id, *_ = self.events.get(timeout=remaining)
            ready.add(client_id)
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 30) -> dict[int, dict]:
        self.stop_event.set()
        self.stopped_at = time.monotonic()
        results, deadline = {}, time.monotonic() + timeout
        while len(results) < len(self.processes) and time.monotonic() < deadline:
            try:
                message = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if message[0] == "done":
                results[message[1]] = message[2]
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        if len(results) < len(self.processes):
            raise RuntimeError(f"only {len(results)} of {len(self.processes)} load clients reported their commit log")
        return results


class Churn:
    """Updates, inserts and deletes on existing tables at a steady rate from one thread (reconnecting after any
    error): a busy database for verification. One row (the hot row) is updated by every operation."""

    def __init__(self, dsn: str, rate: float = 300, table: str = "public.orders", hot_id: int = 1, reach: int = 1000):
        """Updates touch the hot row and ids from max(id) - reach up."""
        self.dsn, self.rate, self.table, self.hot_id, self.reach = dsn, rate, table, hot_id, reach
        self.committed = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        schema, name = self.table.split(".")
        table = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        hot = (sql.SQL("UPDATE {} SET amount = amount + 1, note = clock_timestamp()::text WHERE id = %s").format(table),
               (self.hot_id,))
        others = [
            (sql.SQL("UPDATE {} SET amount = amount + 1 WHERE id = (SELECT max(id) - (random() * %s)::int FROM {})")
             .format(table, table), (self.reach,)),
            (sql.SQL("INSERT INTO {} (account_id, amount, note) SELECT account_id, 1, 'churn' FROM {} WHERE id = %s")
             .format(table, table), (self.hot_id,)),
            (sql.SQL("DELETE FROM {} WHERE id = (SELECT min(id) FROM {} WHERE note = 'churn')").format(table, table), None),
        ]
        connection, step, next_at = None, 0, time.monotonic()
        while not self._stop.is_set():
            next_at = max(next_at + 1.0 / self.rate, time.monotonic() - 0.05)
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                if connection is None:
                    connection = psycopg2.connect(self.dsn, connect_timeout=3)
                with connection.cursor() as cursor:
                    for statement, params in (hot, others[step % len(others)]):
                        cursor.execute(statement, params)
                connection.commit()
                self.committed += 1
            except psycopg2.Error:
                self.errors += 1
                connection = _drop(connection)
            step += 1
        _drop(connection)
