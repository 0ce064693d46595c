"""Debian's Chromium for the browser tests (driven by the Python `playwright` package; no browser download).

Installed with apt-get when missing, like HAProxy and Redis. `launch_options()` gives what the tests pass to
`playwright.chromium.launch`: headless, no sandbox (the tests run as root), and no background networking, which
this kind of machine's closed network refuses.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from topology.procs import TopologyError, apt_install

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def ensure_chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    if found:
        return found
    apt_install("chromium")
    found = shutil.which("chromium")
    if not found:
        raise TopologyError("chromium still not found after apt-get install chromium")
    return found


def launch_options(user_data_dir: Path) -> dict:
    """For playwright's `chromium.launch_persistent_context(user_data_dir, **launch_options(...))`."""
    user_data_dir.mkdir(parents=True, exist_ok=True)
    return {"executable_path": ensure_chromium(), "headless": True, "args": list(FLAGS)}
