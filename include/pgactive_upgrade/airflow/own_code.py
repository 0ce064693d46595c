"""The package's own code in the forkserver preload, read afresh by any process forked after a file of it changed.

Each task process imports the operators and the domain while it parses the DAG file: about a third of a short
step's CPU (bench/fleet.py), most of it building the dataclasses. The preload imports them once; every process
forked from it afterwards (the LocalExecutor's workers, and their task processes) first compares the package's
files with what was preloaded, and when one was changed, added or removed, forgets the whole package, so the step
imports the new version from disk. Deploying a new version therefore needs no restart; until the scheduler restarts,
its task processes import the package themselves again, as without the preload.

Two limits: a deploy that lands between a task process's fork and its DAG parse (milliseconds) may mix versions in
that one task, as any import during a deploy may; and `aws_session.py` is held by the Amazon provider once imported
(Airflow's `[aws] session_factory`), so a change to it needs a restart, as any class Airflow's configuration names.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path

PACKAGE = "pgactive_upgrade"
# While the preload runs: the module being imported and its packages (importlib needs it in sys.modules at its end)
IMPORTING = (PACKAGE, f"{PACKAGE}.airflow", f"{PACKAGE}.airflow.preload", __name__)
# As imported, not resolved: after a git-sync swap of the symlink, the path leads to the new version's files.
FOLDER = Path(__file__).absolute().parents[1]
# each file of the package -> (what os.stat said, a digest of its content), taken before the preload imported it
_preloaded: dict[str, tuple[tuple[int, ...], str | None]] = {}


def preload(modules: tuple[str, ...]) -> None:
    """Imports `modules` for the processes forked later. If one fails (a deploy half done), forgets the package:
    every task process then imports it from disk, as without the preload."""
    _preloaded.update({path: (_identity(path), _digest(path)) for path in _files()})
    os.register_at_fork(after_in_child=forget_if_changed)
    try:
        for name in modules:
            importlib.import_module(name)
    except Exception as error:  # the forkserver would drop an ImportError silently, and die of anything else
        forget(keep=IMPORTING)
        print(f"pgactive_upgrade: not preloaded, each task process imports it ({error!r})", file=sys.stderr)


def forget_if_changed() -> None:
    if _preloaded and (set(_files()) != set(_preloaded) or any(_changed(path) for path in _preloaded)):
        forget()


def forget(keep: tuple[str, ...] = ()) -> None:
    for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
        if name not in keep:
            del sys.modules[name]
    _preloaded.clear()


def _changed(path: str) -> bool:
    identity, digest = _preloaded[path]
    return _identity(path) != identity and _digest(path) != digest  # a new inode alone (git-sync) changes nothing


def _files() -> list[str]:
    return [str(path) for path in FOLDER.rglob("*.py")]


def _identity(path: str) -> tuple[int, ...]:
    try:
        status = os.stat(path)
    except OSError:
        return ()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
