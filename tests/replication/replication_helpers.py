"""Small helpers for the replication suite."""

from __future__ import annotations

import time

from pgactive_upgrade.config import Filters

DATABASE = "app"
FILTERS = Filters(exclude_schemas=("scratch",))


def sql_one(server, statement, params=None, dbname=DATABASE):
    connection = server.connect(dbname=dbname)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchone()
    finally:
        connection.close()


def sql_all(server, statement, params=None, dbname=DATABASE):
    connection = server.connect(dbname=dbname)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def wait_for(predicate, timeout: float = 30.0, pause: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(pause)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")


def synced(driver, threshold: int = 65536):
    lag = driver.lag()
    return lag if lag.within(threshold) else None
