import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Airflow reads these at import time: keep every test run away from ~/airflow and the example DAGs.
os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".local" / "airflow-test-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))

import pytest  # noqa: E402

from topology import Ports, Topology  # noqa: E402

TEST_BASE = int(os.environ.get("PGU_TEST_BASE", "26400"))
TEST_STATE_DIR = Path(os.environ.get("PGU_TEST_STATE_DIR", ".local/test"))


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs the local topology (PostgreSQL, moto, HAProxy)")
    config.addinivalue_line("markers", "e2e: end-to-end run of the upgrade against the local topology")
    config.addinivalue_line("markers", "airflow: needs a real local Airflow (api-server, scheduler, triggerer)")


@pytest.fixture(scope="session")
def topology():
    topo = Topology(state_dir=TEST_STATE_DIR, ports=Ports.from_base(TEST_BASE))
    topo.reset()
    topo.up()
    yield topo
    topo.down()


@pytest.fixture
def fresh_databases(topology):
    """Freshly seeded demo database, a wiped-and-seeded moto and default HAProxy weights."""
    return reset_topology(topology)


def reset_topology(topology):
    topology.up()
    topology.seed_database(rows=2000)
    topology.reset_aws()
    topology.seed_aws()
    topology.haproxy.reset_weights()
    return topology


@pytest.fixture
def seeded_topology(fresh_databases):
    return fresh_databases
