"""moto in server mode, reached through endpoint_url."""
from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from topology.procs import TopologyError, require_port_free, running_pid, terminate, wait_until


class MotoServer:
    def __init__(self, state_dir: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.pidfile = state_dir / "moto.pid"
        self.log_file = state_dir / "moto.log"

    def pid(self) -> int | None:
        return running_pid(self.pidfile, "moto")

    def is_running(self) -> bool:
        return self.pid() is not None

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def ensure_running(self) -> None:
        if self.is_running():
            wait_until(self.answers, 20, f"moto on port {self.port}")
            return
        require_port_free(self.port, "moto_server")
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [*_moto_command(), "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pidfile.write_text(f"{process.pid}\n")
        try:
            wait_until(lambda: self.answers() or process.poll() is not None, 30, f"moto on port {self.port}")
        except TopologyError:
            terminate(process.pid, group=True)
            raise
        if process.poll() is not None:
            raise TopologyError(f"moto_server exited with {process.returncode}; see {self.log_file}")

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise TopologyError(f"moto reset answered HTTP {response.status}")

    def stop(self) -> None:
        terminate(self.pid(), group=True)


def _moto_command() -> list[str]:
    script = Path(sys.executable).parent / "moto_server"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "moto.server"]
