"""The whole-run tests' fixtures: a migrated metadata database and the topology's Airflow environment."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def airflow_db():
    result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def upgrade_env(fresh_databases, airflow_db, monkeypatch):
    topo = fresh_databases
    for key, value in topo.airflow_connections_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topo.new_pg.bin_dir))
    from airflow.models import Variable

    for key in ("pgactive_upgrade__orders-db", "pgactive_upgrade__orders-db__halt"):
        Variable.delete(key)  # fresh databases: an earlier test's cutover record no longer applies
    return topo
