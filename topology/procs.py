"""Pidfile, port and readiness helpers shared by the services."""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path


class TopologyError(RuntimeError):
    pass


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    _reap_if_child(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _reap_if_child(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running_pid(pidfile: Path, expected_in_cmdline: str) -> int | None:
    """The pid from pidfile if that process is alive and is what we started (guards against pid reuse)."""
    pid = read_pid(pidfile)
    if pid_alive(pid) and expected_in_cmdline in pid_cmdline(pid):
        return pid
    return None


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_port_free(port: int, service: str) -> None:
    if port_open(port):
        raise TopologyError(
            f"port {port} on 127.0.0.1 (wanted for {service}) is already in use by a process this "
            f"topology did not start; stop it or choose another --base"
        )


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def terminate(pid: int | None, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after timeout; returns once the process is gone."""
    if not pid_alive(pid):
        return
    _signal(pid, signal.SIGTERM, group)
    try:
        wait_until(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
    except TopologyError:
        _signal(pid, signal.SIGKILL, group)
        wait_until(lambda: not pid_alive(pid), 5.0, f"pid {pid} to die after SIGKILL")


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def exclusive_lock(lock_path: Path):
    """One process at a time across processes: an flock on lock_path, created when missing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def apt_install(package: str) -> None:
    """`apt-get update` and `apt-get install` of one Debian package (needs root), non-interactive."""
    import subprocess

    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if result.returncode != 0:
            raise TopologyError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
