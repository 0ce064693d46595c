from __future__ import annotations

import json
import secrets
import shutil
import string
from pathlib import Path

import psycopg2

from topology import aws, seed
from topology.haproxy import HAProxy
from topology.moto import MotoServer
from topology.pgbinaries import LOCAL_DIR, REPO_ROOT, new_pg_bin_dir, old_pg_bin_dir
from topology.ports import Ports
from topology.postgres import HOST, Server
from topology.procs import TopologyError, exclusive_lock, pid_alive

ROLES = ("postgres", "replicator", "app", "prober")
PASSWORD_ALPHABET = string.ascii_letters + string.digits


class Topology:
    def __init__(self, state_dir: Path | str = Path(".local/demo"), ports: Ports | None = None,
                 server_settings: dict | None = None):
        """server_settings: PostgreSQL settings over the defaults on both servers (written when a server starts)."""
        state_dir = Path(state_dir)
        self.state_dir = state_dir if state_dir.is_absolute() else REPO_ROOT / state_dir
        self.ports = ports or Ports.from_base(25400)
        self.credentials: dict[str, str] = {}
        self.aws_seed: dict | None = None
        self._load_credentials()
        socket_dir = self.state_dir / "sock"
        self.old_pg = Server("old", 15, self.ports.old_pg, self.state_dir / "old_pg", socket_dir,
                             self.credentials, old_pg_bin_dir, server_settings)
        self.new_pg = Server("new", 17, self.ports.new_pg, self.state_dir / "new_pg", socket_dir,
                             self.credentials, new_pg_bin_dir, server_settings)
        self.moto = MotoServer(self.state_dir, self.ports.moto)
        self.moto_url = self.moto.url
        self.haproxy = HAProxy(self.state_dir, self.ports.haproxy_write, self.ports.haproxy_read,
                               self.ports.haproxy_runtime, self.ports.old_pg, self.ports.new_pg)

    def __repr__(self) -> str:
        return f"Topology(state_dir={str(self.state_dir)!r}, ports={self.ports})"

    def up(self) -> Topology:
        with self._locked():
            self._prepare_state_dir()
            self._load_credentials(persist_missing=True)
            for server in (self.old_pg, self.new_pg):
                server.ensure_binaries()
            self.old_pg.ensure_running()
            self.new_pg.ensure_running()
            self.moto.ensure_running()
            self.haproxy.ensure_running()
        return self

    def down(self) -> None:
        with self._locked():
            self._stop_all()

    def reset(self) -> None:
        with self._locked():
            self._stop_all()
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.credentials.clear()

    def status(self) -> dict:
        services = {
            "old_pg": (self.old_pg.pid(), self.old_pg.port),
            "new_pg": (self.new_pg.pid(), self.new_pg.port),
            "moto": (self.moto.pid(), self.moto.port),
            "haproxy": (self.haproxy.pid(), self.haproxy.write_port),
        }
        return {
            "state_dir": str(self.state_dir),
            "ports": self.ports.as_dict(),
            "services": {name: {"running": pid is not None, "pid": pid, "port": port}
                         for name, (pid, port) in services.items()},
            "moto_url": self.moto_url,
            "haproxy_runtime_api": self.haproxy.runtime_api,
        }

    def pids(self) -> dict[str, int | None]:
        return {name: info["pid"] for name, info in self.status()["services"].items()}

    def seed_database(self, rows: int = 20000) -> None:
        seed.seed_database(self.old_pg, self.new_pg, rows)

    def seed_aws(self, source_instance_id: str = "orders-db") -> dict:
        self.aws_seed = aws.seed_aws(self.moto_url, source_instance_id, self.credentials["postgres"])
        return self.aws_seed

    def reset_aws(self) -> None:
        """Wipes all moto state (every account and region)."""
        self.moto.reset()

    def aws_client(self, service: str):
        return aws.client(service, self.moto_url)

    def airflow_connections_env(self) -> dict[str, str]:
        def postgres_conn(login: str) -> str:
            return json.dumps({"conn_type": "postgres", "host": HOST, "port": self.old_pg.port, "login": login,
                               "password": self.credentials[login], "schema": seed.DATABASE})

        return {
            "AIRFLOW_CONN_PGU_AWS": json.dumps({
                "conn_type": "aws", "login": "testing", "password": "testing",
                "extra": {"endpoint_url": self.moto_url, "region_name": aws.REGION},
            }),
            "AIRFLOW_CONN_PGU_DB_ADMIN": postgres_conn("postgres"),
            "AIRFLOW_CONN_PGU_REPLICATION": postgres_conn("replicator"),
            "AIRFLOW_CONN_PGU_PROBE": postgres_conn("prober"),
            "AIRFLOW_VAR_PGACTIVE_UPGRADE_DEPLOYMENT": json.dumps(self.deployment()),
        }

    def deployment(self, sources=("orders-db",), admin_conn_ids=("pgu_db_admin",)) -> dict:
        """The deployment configuration of the local topology (README, Deployment security): its connections, its
        servers on 127.0.0.1 (any port), the demo's source, and the local-only TLS opt-out (the local servers run
        without TLS)."""
        return {
            "connections": {"db_conn_id": list(admin_conn_ids), "replication_conn_id": ["pgu_replication"],
                            # pgu_aws_slow: RDS through the harness's slow proxy (tests/airflow_real/test_rds_waits.py)
                            "probe_conn_id": ["pgu_probe"], "aws_conn_id": ["pgu_aws", "pgu_aws_slow"]},
            "endpoint_override_targets": [f"{HOST}:*"],
            "sources": {"identifiers": list(sources)},
            "tls": {"local_only_no_tls": True},
        }

    def port_behind(self, frontend_port: int, dbname: str = "postgres") -> int:
        """The PostgreSQL port a new application connection through an HAProxy frontend lands on."""
        connection = psycopg2.connect(host=HOST, port=frontend_port, user="app", password=self.credentials["app"],
                                      dbname=dbname, connect_timeout=5)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT inet_server_port()")
                return cursor.fetchone()[0]
        finally:
            connection.close()

    def endpoint_overrides(self, source_id: str = "orders-db", target_id: str = "orders-db-pg17") -> dict[str, str]:
        return {source_id: f"{HOST}:{self.old_pg.port}", target_id: f"{HOST}:{self.new_pg.port}"}

    def _stop_all(self) -> None:
        services = (self.haproxy, self.moto, self.new_pg, self.old_pg)
        pids = [service.pid() for service in services]
        for service in services:
            service.stop()
        survivors = [pid for pid in pids if pid_alive(pid)]
        if survivors:
            raise TopologyError(f"processes still alive after down(): {survivors}")

    def _prepare_state_dir(self) -> None:
        """The postgres system user must be able to traverse into the state dir."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for directory in (LOCAL_DIR, self.state_dir):
            if directory.is_dir():
                directory.chmod(directory.stat().st_mode | 0o755)

    def _load_credentials(self, persist_missing: bool = False) -> None:
        """Passwords are generated once per state_dir by up() and reused until reset()."""
        path = self.state_dir / "credentials.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        missing = [role for role in ROLES if role not in stored]
        if missing and persist_missing:
            stored.update({role: _generate_password() for role in missing})
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(json.dumps(stored, indent=2))
        self.credentials.clear()
        self.credentials.update(stored)

    def _locked(self):
        return exclusive_lock(self.state_dir.parent / f".{self.state_dir.name}.lock")


def _generate_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(24))
