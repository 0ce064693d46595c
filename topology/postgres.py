"""One local PostgreSQL cluster run as the `postgres` system user."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from collections.abc import Callable

import psycopg2
from psycopg2 import sql

from topology.pgbinaries import pgactive_available, server_settings
from topology.procs import TopologyError, port_open, require_port_free, running_pid, terminate

OS_USER = "postgres"
HOST = "127.0.0.1"
NON_SUPERUSER_ROLES = {"replicator": "LOGIN REPLICATION", "app": "LOGIN", "prober": "LOGIN"}
PROBE_ROLE = "prober"  # the health probes' read-only role, granted as README's "Deployment security" shows
DRIVER_ENV = "PGU_DRIVER"

HBA = """\
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
"""


def _quote_conninfo(value) -> str:
    text = str(value)
    if text and not any(char in text for char in " '\\"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Server:
    host = HOST

    def __init__(self, name: str, major: int, port: int, base_dir: Path, socket_dir: Path,
                 credentials: dict[str, str], resolve_bin_dir: Callable[[], Path], settings: dict | None = None):
        self.name = name
        self.major = major
        self.port = port
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "postgres.log"
        self.socket_dir = socket_dir
        self._credentials = credentials
        self._resolve_bin_dir = resolve_bin_dir
        self._bin_dir: Path | None = None
        self.extra_settings = dict(settings or {})  # over the defaults (e.g. a fleet bench's capacity)

    def __repr__(self) -> str:
        return f"Server({self.name!r}, major={self.major}, port={self.port})"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = Path(self._resolve_bin_dir())
        return self._bin_dir

    def ensure_binaries(self) -> Path:
        return self.bin_dir

    @property
    def pgactive(self) -> bool:
        """Start with pgactive loaded: when it is installed, unless PGU_DRIVER=native; PGU_DRIVER=pgactive requires it."""
        driver = os.environ.get(DRIVER_ENV, "")
        if driver == "native":
            return False
        available = pgactive_available(self.bin_dir)
        if driver == "pgactive" and not available:
            raise TopologyError(
                f"{DRIVER_ENV}=pgactive but the {self.name} PostgreSQL at {self.bin_dir} has no pgactive extension "
                f"(point PGU_OLD_PG_BIN / PGU_NEW_PG_BIN at a pgactive-enabled build)"
            )
        return available

    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        parts = {"host": self.host, "port": self.port, "user": user, "password": self._credentials[user],
                 "dbname": dbname, "connect_timeout": 5}
        return " ".join(f"{key}={_quote_conninfo(value)}" for key, value in parts.items())

    def connect(self, user: str = "postgres", dbname: str = "postgres", autocommit: bool = True):
        connection = psycopg2.connect(self.dsn(user, dbname))
        connection.autocommit = autocommit
        return connection

    def pid(self) -> int | None:
        return running_pid(self.data_dir / "postmaster.pid", "postgres")

    def is_running(self) -> bool:
        return self.pid() is not None

    def ensure_running(self) -> None:
        if self.is_running():
            if not port_open(self.port):
                raise TopologyError(f"{self.name} PostgreSQL (pid {self.pid()}) is running but not listening on {self.port}")
            return
        require_port_free(self.port, f"{self.name} PostgreSQL {self.major}")
        # A crashed postmaster leaves lock files naming its pid; if that pid lingers as a zombie, a new
        # postmaster would take it as alive and refuse to start.
        for lock_file in (self.data_dir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.port}.lock"):
            lock_file.unlink(missing_ok=True)
        self._initdb_if_missing()
        self._write_config()
        self._pg_ctl("start", "-l", str(self.log_file), "-w", "-t", "60")
        self._ensure_roles()

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60", check=False)
        terminate(pid, timeout=30)

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        result = _run_as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args])
        if check and result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise TopologyError(
                f"pg_ctl {args[0]} failed for {self.name} PostgreSQL on port {self.port}:\n"
                f"{result.stdout}{result.stderr}\n--- {self.log_file} ---\n{log_tail}"
            )

    def _initdb_if_missing(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        shutil.rmtree(self.data_dir, ignore_errors=True)
        for directory in (self.base_dir, self.socket_dir):
            directory.mkdir(parents=True, exist_ok=True)
            _chown_to_postgres(directory)
            directory.chmod(0o700)
        self._require_postgres_can_reach(self.base_dir)
        pwfile = self.base_dir / "initdb.pw"
        pwfile.write_text(self._credentials["postgres"] + "\n")
        pwfile.chmod(0o600)
        _chown_to_postgres(pwfile)
        try:
            result = _run_as_postgres([
                str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
                "--no-sync",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise TopologyError(f"initdb failed for {self.name} PostgreSQL:\n{result.stdout}{result.stderr}")
        conf = self.data_dir / "postgresql.conf"
        conf.write_text(conf.read_text() + "\ninclude_if_exists = 'topology.conf'\n")
        (self.data_dir / "pg_hba.conf").write_text(HBA)

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": self.port,
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": 300,
            "wal_level": "logical",
            "max_replication_slots": 20,
            "max_wal_senders": 20,
            "max_worker_processes": 16,
            "max_logical_replication_workers": 8,
            "max_prepared_transactions": 10,  # the hostile schema holds a prepared transaction
            "track_commit_timestamp": "on",
            "fsync": "off",
            "full_page_writes": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        if self.pgactive:
            settings.update(self._pgactive_settings())
        settings.update(self.extra_settings)
        conf = self.data_dir / "topology.conf"
        conf.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        _chown_to_postgres(conf)

    def _pgactive_settings(self) -> dict:
        settings = {"shared_preload_libraries": "'pgactive'", "max_worker_processes": 32}
        # Where the server has this list (17.11+), a slot with pgactive's output plugin is refused unless it is named.
        if "output_plugin_libraries" in server_settings(self.bin_dir):
            settings["output_plugin_libraries"] = "'pgoutput, test_decoding, pgactive'"
        return settings

    def _ensure_roles(self) -> None:
        with self.connect() as connection, connection.cursor() as cursor:
            for role, attributes in NON_SUPERUSER_ROLES.items():
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                verb = "ALTER" if cursor.fetchone() else "CREATE"
                cursor.execute(
                    sql.SQL("{} ROLE {} " + attributes + " PASSWORD %s").format(sql.SQL(verb), sql.Identifier(role)),
                    (self._credentials[role],),
                )
            for granted in ("pg_read_all_data", "pg_read_all_stats"):  # the tables; pg_stat_statements' texts
                cursor.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(granted), sql.Identifier(PROBE_ROLE)))
        connection.close()

    @staticmethod
    def _require_postgres_can_reach(directory: Path) -> None:
        if _run_as_postgres(["test", "-w", str(directory)]).returncode != 0:
            raise TopologyError(
                f"the postgres system user cannot reach {directory}; every parent directory must be "
                f"traversable by others (chmod o+x)"
            )


def _run_as_postgres(command: list[str]) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        command = ["runuser", "-u", OS_USER, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd="/")


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(OS_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
