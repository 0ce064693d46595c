"""Our own Redis (Debian's redis-server, never its systemd service) on 127.0.0.1: the Celery executor's broker.

Started in the foreground-less daemon mode with every file (pid, log, working dir) in its own state dir and
persistence off: no RDB snapshot, no append-only file, nothing written anywhere else.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from topology.procs import (
    TopologyError, apt_install, port_open, require_port_free, running_pid, terminate, wait_until,
)

SBIN_DIRS = "/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin"


def ensure_redis_server() -> str:
    found = shutil.which("redis-server", path=SBIN_DIRS)
    if found:
        return found
    apt_install("redis-server")
    found = shutil.which("redis-server", path=SBIN_DIRS)
    if not found:
        raise TopologyError("redis-server still not found after apt-get install redis-server")
    return found


class RedisServer:
    def __init__(self, state_dir: Path, port: int):
        self.state_dir = Path(state_dir)
        self.port = port
        self.pidfile = self.state_dir / "redis.pid"
        self.log_file = self.state_dir / "redis.log"

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, state_dir={str(self.state_dir)!r})"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        return [
            "--bind", "127.0.0.1", "--port", str(self.port), "--protected-mode", "yes",
            "--daemonize", "yes", "--pidfile", str(self.pidfile), "--logfile", str(self.log_file),
            "--dir", str(self.state_dir), "--save", "", "--appendonly", "no",
        ]

    def pid(self) -> int | None:
        return running_pid(self.pidfile, "redis-server")

    def is_running(self) -> bool:
        return self.pid() is not None

    def ensure_running(self) -> None:
        if self.is_running():
            return
        require_port_free(self.port, "Redis (Celery broker)")
        binary = ensure_redis_server()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)
        started = subprocess.run([binary, *self.arguments()], stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, cwd=self.state_dir)
        if started.returncode != 0:
            raise TopologyError(f"redis-server failed to start (exit {started.returncode}): "
                                f"{started.stderr[-2000:]}; see {self.log_file}")
        wait_until(lambda: self.is_running() and self.ping(), 10, "Redis to answer PING")

    def ping(self) -> bool:
        return port_open(self.port) and self.command("PING") == "+PONG"

    def command(self, line: str) -> str:
        """One inline command; the first line of the reply (e.g. +PONG, :3, $5)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            connection.sendall(line.encode() + b"\r\n")
            return connection.makefile("rb").readline().decode().strip()

    def stop(self) -> None:
        terminate(self.pid())
