"""Our own HAProxy instance (never the Debian systemd service) in TCP mode with an admin runtime API on TCP."""
from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from topology.procs import (
    TopologyError, apt_install, port_open, require_port_free, running_pid, terminate, wait_until,
)

BACKENDS = ("pg_write", "pg_read")
DEFAULT_WEIGHTS = {"source": 100, "target": 0}


def ensure_haproxy() -> str:
    found = shutil.which("haproxy") or next(
        (str(p) for p in (Path("/usr/sbin/haproxy"), Path("/usr/local/sbin/haproxy")) if p.is_file()), None
    )
    if found:
        return found
    apt_install("haproxy")
    found = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if not found:
        raise TopologyError("haproxy still not found after apt-get install haproxy")
    return found


class HAProxy:
    def __init__(self, state_dir: Path, write_port: int, read_port: int, runtime_port: int,
                 source_port: int, target_port: int):
        self.write_port = write_port
        self.read_port = read_port
        self.runtime_port = runtime_port
        self.runtime_api = f"127.0.0.1:{runtime_port}"
        self.source_port = source_port
        self.target_port = target_port
        self.config_path = state_dir / "haproxy.cfg"
        self.pidfile = state_dir / "haproxy.pid"
        self.log_file = state_dir / "haproxy.log"

    def __repr__(self) -> str:
        return f"HAProxy(write={self.write_port}, read={self.read_port}, runtime_api={self.runtime_api!r})"

    def render_config(self) -> str:
        sections = [
            "global\n"
            f"    stats socket ipv4@{self.runtime_api} level admin\n"
            "    maxconn 4096\n",
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 2s\n"
            "    timeout client 1h\n"
            "    timeout server 1h\n",
        ]
        for backend, port in (("pg_write", self.write_port), ("pg_read", self.read_port)):
            sections.append(f"frontend {backend}_in\n    bind 127.0.0.1:{port}\n    default_backend {backend}\n")
            sections.append(
                f"backend {backend}\n"
                "    balance roundrobin\n"
                f"    server source 127.0.0.1:{self.source_port} weight {DEFAULT_WEIGHTS['source']}\n"
                f"    server target 127.0.0.1:{self.target_port} weight {DEFAULT_WEIGHTS['target']}\n"
            )
        return "\n".join(sections)

    def pid(self) -> int | None:
        return running_pid(self.pidfile, "haproxy")

    def is_running(self) -> bool:
        return self.pid() is not None

    def ensure_running(self) -> None:
        config = self.render_config()
        if self.is_running():
            if self.config_path.read_text() == config:
                return
            self.stop()
        for port, role in ((self.write_port, "HAProxy write frontend"), (self.read_port, "HAProxy read frontend"),
                           (self.runtime_port, "HAProxy runtime API")):
            require_port_free(port, role)
        binary = ensure_haproxy()
        self.config_path.write_text(config)
        checked = subprocess.run([binary, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise TopologyError(f"haproxy rejected {self.config_path}:\n{checked.stdout}{checked.stderr}")
        self.pidfile.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            started = subprocess.run([binary, "-D", "-f", str(self.config_path), "-p", str(self.pidfile)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if started.returncode != 0:
            raise TopologyError(f"haproxy failed to start (exit {started.returncode}); see {self.log_file}")
        wait_until(lambda: self.is_running() and all(map(port_open, (self.write_port, self.read_port, self.runtime_port))),
                   10, "HAProxy to listen")

    def stop(self) -> None:
        terminate(self.pid())

    def command(self, line: str) -> str:
        with socket.create_connection(("127.0.0.1", self.runtime_port), timeout=5) as conn:
            conn.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        reply = self.command(f"set weight {backend}/{server} {int(weight)}").strip()
        if reply:
            raise TopologyError(f"HAProxy refused weight {weight} for {backend}/{server}: {reply}")

    def get_weight(self, backend: str, server: str) -> int:
        reply = self.command(f"get weight {backend}/{server}").strip()
        try:
            return int(reply.split()[0])
        except (IndexError, ValueError):
            raise TopologyError(f"unexpected reply to get weight {backend}/{server}: {reply!r}") from None

    def reset_weights(self) -> None:
        """Back to all traffic on the source; also takes servers out of drain/maint."""
        for backend in BACKENDS:
            for server, weight in DEFAULT_WEIGHTS.items():
                self.command(f"set server {backend}/{server} state ready")
                self.set_weight(backend, server, weight)
