"""Shared steps of the integration tests."""

from __future__ import annotations

import time

from pgactive_upgrade import config
from pgactive_upgrade.db import Credentials
from pgactive_upgrade.upgrade import Upgrade
from topology.demo import demo_conf


def upgrade_of(topo, **overrides) -> Upgrade:
    """An Upgrade of the demo source on the topology, conf overrides applied."""
    return Upgrade(
        config.validate({**demo_conf(topo), **overrides}),
        topo.aws_client("rds"),
        Credentials("postgres", topo.credentials["postgres"]),
        Credentials("replicator", topo.credentials["replicator"]),
        probe=Credentials("prober", topo.credentials["prober"]),
        dbname="app",
        route53_client=topo.aws_client("route53"),
    )


def replicating(upgrade: Upgrade, in_sync: bool = False) -> Upgrade:
    """The upgrade's steps up to replication; in_sync: then wait until the target has caught up."""
    for step in (upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters, upgrade.install,
                 upgrade.build_group):
        step()
    deadline = time.monotonic() + 60
    while in_sync and not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
        assert time.monotonic() < deadline, upgrade.lag()
        time.sleep(0.2)
    return upgrade
