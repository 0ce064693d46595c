"""The package's own code in the forkserver preload, read afresh by any process forked after a file of it changed.

Each task process imports the operators and the domain while it parses the DAG file: about a third of a short
step's CPU (bench/fleet.py), most of it building the dataclasses. The preload imports them once; every process
forked from it afterwards (the LocalExecutor's workers, and their task processes) first compares the package's
files with what was imported, and when one changed, was replaced or is gone, forgets the whole package, so the step
imports the new version. Deploying a new version therefore still needs no restart.
"""

from __future__ import annotations

import importlib
import os
import sys

PACKAGE = "pgactive_upgrade"
_imported: dict[str, tuple[int, int, int] | None] = {}  # file -> what os.stat said when it was imported


def preload(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)
    _imported.update({path: _identity(path) for path in _package_files()})
    os.register_at_fork(after_in_child=forget_if_changed)


def forget_if_changed() -> None:
    if any(_identity(path) != seen for path, seen in _imported.items()):
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        _imported.clear()


def _package_files() -> set[str]:
    modules = [module for name, module in list(sys.modules.items()) if name == PACKAGE or name.startswith(PACKAGE + ".")]
    return {path for path in (getattr(module, "__file__", None) for module in modules) if path}


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino
