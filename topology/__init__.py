"""Local stand-in for the production topology: PostgreSQL 15 (old) and 17 (new), moto, HAProxy."""
from topology.core import Topology
from topology.pgbinaries import ensure_pg_binaries
from topology.ports import Ports
from topology.procs import TopologyError

__all__ = ["Ports", "Topology", "TopologyError", "ensure_pg_binaries"]
