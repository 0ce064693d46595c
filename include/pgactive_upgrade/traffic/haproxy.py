"""HAProxy weights through the runtime API (TCP "host:port" or a unix socket path), one command per connection."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from .base import Route, TrafficController, TrafficError, percent_on_target, validate_percent

# srv_admin_state bits (HAProxy SRV_ADMF_*): any maintenance (FMAINT/IMAINT/CMAINT/RMAINT/HMAINT) or drain (FDRAIN/IDRAIN)
_ADMIN_MAINT_OR_DRAIN = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40
_OP_STATES_SERVING = {1, 2}  # SRV_ST_STARTING, SRV_ST_RUNNING


def runtime_command(runtime_api: str, command: str, timeout: float = 5.0) -> str:
    """Send one command to the HAProxy runtime API and return its whole answer (HAProxy closes after answering)."""
    try:
        with _connect(runtime_api, timeout) as sock:
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise TrafficError(f"HAProxy runtime API {runtime_api}: {command.split()[0]} failed: {exc}") from exc
    return b"".join(chunks).decode(errors="replace")


def _connect(runtime_api: str, timeout: float) -> socket.socket:
    if runtime_api.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(runtime_api)
        except OSError:
            sock.close()
            raise
        return sock
    host, _, port = runtime_api.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def _ip_of(host: str, port: int) -> str:
    """HAProxy's `set server addr` takes an IP; resolve a hostname once, at the time of the change."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])


class HAProxyController(TrafficController):
    def __init__(self, runtime_api: str, routes: Iterable[Route], source_server: str = "source",
                 target_server: str = "target", target_address: tuple[str, int] | None = None, timeout: float = 5.0):
        super().__init__(routes)
        self.runtime_api = runtime_api
        self.source_server = source_server
        self.target_server = target_server
        self.target_address = target_address  # when set, the target server is pointed here before any weight change
        self.timeout = timeout

    def read_split(self) -> dict[str, int]:
        split = {}
        for route in self.routes:
            servers = self._servers(route.name)
            split[route.name] = percent_on_target(self._effective_weight(servers, route.name, self.source_server),
                                                  self._effective_weight(servers, route.name, self.target_server),
                                                  f"HAProxy backend {route.name} ({self._summary(servers)})")
        return split

    def close_source_sessions(self, route_names: Sequence[str] | None = None) -> list[str]:
        """`shutdown sessions server B/source`: established connections to the source are cut (used at cutover)."""
        return self._close_sessions(self.source_server, route_names)

    def close_target_sessions(self, route_names: Sequence[str] | None = None) -> list[str]:
        """The same toward the target (used by rollback)."""
        return self._close_sessions(self.target_server, route_names)

    def describe(self) -> dict:
        return {"controller": "haproxy", "runtime_api": self.runtime_api, "routes": self._routes_summary(),
                "source_server": self.source_server, "target_server": self.target_server,
                "target_address": list(self.target_address) if self.target_address else None}

    def _apply(self, percent: int, routes: tuple[Route, ...]) -> None:
        weights = {self.target_server: percent, self.source_server: 100 - percent}
        # Raise the side that ends up heavier first, so the backend never has both weights at 0.
        order = sorted(weights, key=weights.__getitem__, reverse=True)
        for route in routes:
            if self.target_address:
                self._point_target(route.name)
            servers = self._servers(route.name)
            states = {server: self._server(servers, route.name, server) for server in order}  # both exist?
            for server in order:
                self._ok(f"set weight {route.name}/{server} {weights[server]}")
                if weights[server] and int(states[server]["srv_admin_state"]) & _ADMIN_MAINT_OR_DRAIN:
                    self._ok(f"set server {route.name}/{server} state ready")

    def switch(self, percent: int, close_sessions_of: str | None = None) -> None:
        """One runtime-API round trip for every route (write routes first): the cutover's critical moment."""
        percent = validate_percent(percent)
        servers = {"source": self.source_server, "target": self.target_server}
        weights = {self.target_server: percent, self.source_server: 100 - percent}
        commands = []
        for route in sorted(self.routes, key=lambda r: not r.carries_writes):
            if self.target_address:
                self._point_target(route.name)
            for server in sorted(weights, key=weights.__getitem__, reverse=True):
                if weights[server]:
                    commands.append(f"set server {route.name}/{server} state ready")
                commands.append(f"set weight {route.name}/{server} {weights[server]}")
            if close_sessions_of:
                commands.append(f"shutdown sessions server {route.name}/{servers[close_sessions_of]}")
        answer = runtime_command(self.runtime_api, "; ".join(commands), self.timeout).strip()
        if answer:
            raise TrafficError(f"HAProxy runtime API refused part of the switch to {percent} %: {answer}")

    def _point_target(self, backend: str) -> None:
        assert self.target_address is not None
        host, port = self.target_address
        ip = _ip_of(host, port)
        runtime_command(self.runtime_api, f"set server {backend}/{self.target_server} addr {ip} port {port}",
                        self.timeout)
        target = self._server(self._servers(backend), backend, self.target_server)
        if (target["srv_addr"], target["srv_port"]) != (ip, str(port)):
            raise TrafficError(f"HAProxy {backend}/{self.target_server}: asked address {ip}:{port}, "
                               f"read back {target['srv_addr']}:{target['srv_port']}")

    def _close_sessions(self, server: str, route_names: Sequence[str] | None) -> list[str]:
        routes = self.select_routes(route_names)
        for route in routes:
            self._ok(f"shutdown sessions server {route.name}/{server}")
        return [route.name for route in routes]

    def _ok(self, command: str) -> None:
        answer = runtime_command(self.runtime_api, command, self.timeout).strip()
        if answer:
            raise TrafficError(f"HAProxy runtime API refused '{command}': {answer}")

    def _servers(self, backend: str) -> dict[str, dict[str, str]]:
        """`show servers state <backend>` as {server name: {column: value}}."""
        answer = runtime_command(self.runtime_api, f"show servers state {backend}", self.timeout)
        lines = [line for line in answer.splitlines() if line.strip()]
        header = next((line[2:].split() for line in lines if line.startswith("# ")), None)
        if header is None:
            raise TrafficError(f"HAProxy backend {backend}: cannot read server state, answer was {answer.strip()!r}")
        rows = [dict(zip(header, line.split())) for line in lines if not line.startswith("#") and " " in line]
        return {row["srv_name"]: row for row in rows if row.get("be_name") == backend}

    @staticmethod
    def _server(servers: dict, backend: str, name: str) -> dict[str, str]:
        if name not in servers:
            raise TrafficError(f"HAProxy backend {backend} has no server {name!r}; servers: {sorted(servers)}")
        return servers[name]

    def _effective_weight(self, servers: dict, backend: str, name: str) -> int:
        """The weight that really takes traffic: 0 while the server is in maintenance, draining or down."""
        row = self._server(servers, backend, name)
        if int(row["srv_admin_state"]) & _ADMIN_MAINT_OR_DRAIN or int(row["srv_op_state"]) not in _OP_STATES_SERVING:
            return 0
        return int(row["srv_uweight"])

    @staticmethod
    def _summary(servers: dict) -> str:
        return ", ".join(f"{name} weight={row['srv_uweight']} op={row['srv_op_state']} admin={row['srv_admin_state']}"
                         for name, row in servers.items())
