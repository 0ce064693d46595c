"""Shared steps of the integration tests."""

from __future__ import annotations

import time

from pgactive_upgrade.upgrade import Upgrade


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
