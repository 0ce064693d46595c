"""Upgrades built against the local topology, without Airflow."""

from __future__ import annotations

import pytest

from pgactive_upgrade import config
from pgactive_upgrade.db import Credentials
from pgactive_upgrade.upgrade import Upgrade
from topology.demo import demo_conf


@pytest.fixture
def build(fresh_databases, monkeypatch):
    """(topology, make): make(**conf overrides) builds an Upgrade of the demo source."""
    topo = fresh_databases
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topo.new_pg.bin_dir))

    def make(**overrides) -> Upgrade:
        return Upgrade(
            config.validate({**demo_conf(topo), **overrides}),
            topo.aws_client("rds"),
            Credentials("postgres", topo.credentials["postgres"]),
            Credentials("replicator", topo.credentials["replicator"]),
            dbname="app",
            route53_client=topo.aws_client("route53"),
        )

    return topo, make
