"""Replication drivers behind one interface."""

from __future__ import annotations

from pgactive_upgrade.replication.base import Joining, Lag, Link, Node, ReplicationDriver, ReplicationError
from pgactive_upgrade.replication.native import NativeDriver
from pgactive_upgrade.replication.pgactive import PgactiveDriver

DRIVERS: dict[str, type[ReplicationDriver]] = {"native": NativeDriver, "pgactive": PgactiveDriver}
NOT_BUILT: dict[str, str] = {}


def driver_for(name: str, link: Link) -> ReplicationDriver:
    if name in NOT_BUILT:
        raise NotImplementedError(NOT_BUILT[name])
    try:
        return DRIVERS[name](link)
    except KeyError:
        raise ValueError(f"replication_driver: unknown driver {name!r}, expected one of {sorted(DRIVERS)}") from None


__all__ = [
    "Joining", "Lag", "Link", "Node", "ReplicationDriver", "ReplicationError", "driver_for", "NOT_BUILT", "NativeDriver",
    "PgactiveDriver",
]
