"""Database endpoints, credentials and connections (psycopg2)."""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import psycopg2
from psycopg2 import sql

APPLICATION_NAME = "pgactive_upgrade"


@dataclass(frozen=True)
class Tls:
    """How a client makes sure of the server before any secret goes out (libpq's own options).

    sslmode/sslrootcert: the server's certificate is checked against the CA bundle and the host name (verify-full).
    require_auth: the only authentication requests the client answers; scram-sha-256 never sends the password,
    and a server that skips authentication or asks for a clear-text or md5 password is refused (libpq 16+).
    peer_sslmode: in the connection strings one server uses to reach the other (subscriptions, pgactive), where
    no CA bundle on the server can be assumed (RDS gives the server none).
    """

    sslmode: str = "verify-full"
    sslrootcert: str = ""
    require_auth: str = "scram-sha-256"
    peer_sslmode: str = "require"
    loopback_only: bool = False  # the local-only opt-out: no server off this machine is reached with it
    local_hosts: tuple[str, ...] = ()  # with loopback_only: names that count as local too (a compose network)

    def libpq(self) -> dict[str, str]:
        if self.require_auth and psycopg2.__libpq_version__ < 160000:
            raise RuntimeError(f"require_auth needs libpq 16 or newer; this psycopg2 uses libpq "
                               f"{psycopg2.__libpq_version__}: use a psycopg2 built with libpq 16+ (the pinned "
                               "psycopg2-binary bundles libpq 17)")
        args = {"sslmode": self.sslmode, "sslrootcert": self.sslrootcert, "require_auth": self.require_auth}
        return {key: value for key, value in args.items() if value}


@dataclass(frozen=True)
class Credentials:
    """A login. tls None: libpq's defaults (tests and benches on local servers); the Airflow layer always sets it
    from the deployment. token: IAM database authentication, a short-lived password made for each server
    (host, port, user) when connecting; then `password` is empty."""

    user: str
    password: str = field(default="", repr=False)
    tls: Tls | None = None
    token: Callable[[str, int, str], str] | None = field(default=None, repr=False, compare=False)

    def password_for(self, endpoint: Endpoint) -> str:
        if self.token is not None:
            return self.token(endpoint.server_host or endpoint.host, endpoint.server_port or endpoint.port, self.user)
        return self.password

    def libpq(self, endpoint: Endpoint) -> dict[str, str]:
        """libpq parameters for this login at `endpoint`: address, TLS and password (never log them)."""
        if self.tls and self.tls.loopback_only and not (is_loopback(endpoint.host) or
                                                       endpoint.host in self.tls.local_hosts):
            raise ValueError(f"{endpoint.host}: the deployment's local-only TLS opt-out (tls.local_only_no_tls) "
                             "applies to loopback addresses only; this server must be reached with TLS")
        args = {**endpoint.libpq(), "user": self.user, "password": self.password_for(endpoint)}
        return {**args, **(self.tls.libpq() if self.tls else {})}


@dataclass(frozen=True)
class Endpoint:
    """host/port: where the server is reached. server_host/server_port: the server's own name (the RDS endpoint)
    when it is reached elsewhere through an override; its certificate and an IAM token are for that name."""

    host: str
    port: int
    dbname: str
    server_host: str = ""
    server_port: int = 0

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"

    def libpq(self) -> dict[str, str]:
        """An override given as an IP address is dialled as hostaddr, so TLS still checks the server's own name."""
        args = {"host": self.host, "port": str(self.port), "dbname": self.dbname}
        if self.server_host and self.server_host != self.host and _is_ip(self.host):
            args.update(host=self.server_host, hostaddr=self.host)
        return args

    def as_dict(self) -> dict:
        return {"host": self.host, "port": self.port, "dbname": self.dbname, "server_host": self.server_host,
                "server_port": self.server_port}

    @classmethod
    def from_dict(cls, spec: dict) -> Endpoint:
        return cls(spec["host"], int(spec["port"]), spec["dbname"], spec.get("server_host", ""),
                   int(spec.get("server_port") or 0))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    return _is_ip(host) and ipaddress.ip_address(host).is_loopback


def override_endpoint(identifier: str, host: str | None, port: int | None, overrides: dict[str, str]) -> tuple[str, int]:
    """The address to use for an instance: its override when one is set, else the RDS endpoint."""
    if identifier in overrides:
        override_host, port_text = overrides[identifier].rsplit(":", 1)
        return override_host, int(port_text)
    if host is None or port is None:
        raise ValueError(f"{identifier}: RDS reports no endpoint yet (the instance is still being created?)")
    return host, port


def conninfo(endpoint: Endpoint, credentials: Credentials) -> str:
    """A libpq key/value string for CREATE SUBSCRIPTION and pgactive DSNs (contains the password: never log it).
    The server keeps it and reconnects with it for as long as replication runs: a password, never an IAM token
    (it expires after 15 minutes)."""
    if credentials.token is not None:
        raise ValueError(f"role {credentials.user!r}: a server-to-server connection needs a password, and this "
                         "connection uses IAM authentication (see README, Deployment security)")
    parts = {"host": endpoint.host, "port": str(endpoint.port), "dbname": endpoint.dbname, "user": credentials.user,
             "password": credentials.password}
    if credentials.tls and credentials.tls.peer_sslmode:
        parts["sslmode"] = credentials.tls.peer_sslmode
    return " ".join(f"{key}='{_escape(value)}'" for key, value in parts.items())


LIBPQ_ENVIRONMENT = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
                     "user": "PGUSER", "password": "PGPASSWORD", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
                     "require_auth": "PGREQUIREAUTH"}


def libpq_environment(endpoint: Endpoint, credentials: Credentials) -> dict[str, str]:
    """The same connection for a libpq program (pg_dump, psql): in its environment, never on its command line."""
    return {LIBPQ_ENVIRONMENT[key]: value for key, value in credentials.libpq(endpoint).items()}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# A dead peer is noticed within seconds on both ends: the server ends a session whose client vanished (which
# releases the locks it held, such as a cutover's), and the client stops waiting on a server that went away.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"


def connect(endpoint: Endpoint, credentials: Credentials, *, autocommit: bool = True, connect_timeout: int = 10,
            statement_timeout_ms: int | None = None):
    """statement_timeout_ms: every statement of the session ends by then (connections used inside a fence)."""
    options = SERVER_KEEPALIVES
    if statement_timeout_ms:
        options += f" -c statement_timeout={int(statement_timeout_ms)}"
    connection = psycopg2.connect(
        **credentials.libpq(endpoint),
        connect_timeout=connect_timeout,
        application_name=APPLICATION_NAME,
        options=options,
        **KEEPALIVES,
    )
    connection.autocommit = autocommit
    return connection


@contextlib.contextmanager
def connected(endpoint: Endpoint, credentials: Credentials, **kwargs) -> Iterator:
    connection = connect(endpoint, credentials, **kwargs)
    try:
        yield connection
    finally:
        connection.close()


def query(connection, statement, params=None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def execute(connection, statement, params=None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier(name)])


def server_major(connection) -> int:
    return int(query(connection, "SHOW server_version_num")[0][0]) // 10000
