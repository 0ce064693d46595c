"""Upgrades built against the local topology, without Airflow."""

from __future__ import annotations

import pytest

from pgactive_upgrade.upgrade import Upgrade
from tests.integration.integration_parts import upgrade_of


@pytest.fixture
def build(fresh_databases, monkeypatch):
    """(topology, make): make(**conf overrides) builds an Upgrade of the demo source."""
    topo = fresh_databases
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topo.new_pg.bin_dir))

    def make(**overrides) -> Upgrade:
        return upgrade_of(topo, **overrides)

    return topo, make
