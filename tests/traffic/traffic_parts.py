"""Real parts for the traffic tests: two named TCP servers, a real HAProxy in front of them, a moto server."""
from __future__ import annotations

import shutil
import socket
import socketserver
import subprocess
import sys
import time
from pathlib import Path

SOURCE_PORT, TARGET_PORT, SPARE_PORT = 26700, 26701, 26702  # SPARE_PORT: nothing listens there
WRITE_FRONTEND, READ_FRONTEND = 26710, 26711
RUNTIME_API_PORT = 26769
MOTO_PORT = 26750
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")  # the interpreter running the tests has moto


class NamedHandler(socketserver.BaseRequestHandler):
    """Answers each new connection with the server's name, then holds it until the peer closes."""

    def handle(self):
        self.request.sendall(self.server.name.encode() + b"\n")
        try:
            while self.request.recv(1024):
                pass
        except OSError:
            pass


class NamedServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, name: str, port: int):
        self.name = name
        super().__init__(("127.0.0.1", port), NamedHandler)


def ensure_haproxy() -> str:
    if not shutil.which("haproxy"):
        subprocess.run("apt-get update -qq && apt-get install -y -qq haproxy", shell=True, check=True)
    return shutil.which("haproxy")


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def haproxy_config(unix_socket: Path, target_port: int) -> str:
    backends = "".join(f"""
frontend {name}_fe
    bind 127.0.0.1:{port}
    default_backend {name}
backend {name}
    balance roundrobin
    server source 127.0.0.1:{SOURCE_PORT} weight 100
    server target 127.0.0.1:{target_port} weight 0
""" for name, port in (("pg_write", WRITE_FRONTEND), ("pg_read", READ_FRONTEND)))
    return f"""global
    stats socket ipv4@127.0.0.1:{RUNTIME_API_PORT} level admin
    stats socket {unix_socket} level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
{backends}"""


def start_haproxy(tmp_path: Path, target_port: int):
    unix_socket = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(unix_socket, target_port))
    proc = subprocess.Popen([ensure_haproxy(), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for port in (RUNTIME_API_PORT, WRITE_FRONTEND, READ_FRONTEND):
        wait_for_port(port, proc)
    return proc, {"tcp": f"127.0.0.1:{RUNTIME_API_PORT}", "unix": str(unix_socket)}
