"""PostgreSQL client programs: the schema copy needs pg_dump at least as new as the newest server."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path


class ToolError(RuntimeError):
    pass


def candidate_dirs() -> list[Path]:
    configured = [Path(p) for p in os.environ.get("PGU_PG_BIN_DIRS", "").split(os.pathsep) if p]
    installed = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    on_path = [Path(p).parent for p in filter(None, [shutil.which("pg_dump")])]
    return configured + installed + on_path


def major_of(program: Path) -> int:
    output = subprocess.run([str(program), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", output)
    if not match:
        raise ToolError(f"cannot read the version of {program}: {output!r}")
    return int(match.group(1))


def find_program(name: str, min_major: int) -> Path:
    """The newest `name` whose major version is at least min_major."""
    found = []
    for directory in candidate_dirs():
        program = directory / name
        if program.is_file() and os.access(program, os.X_OK):
            found.append((major_of(program), program))
    usable = sorted((entry for entry in found if entry[0] >= min_major), reverse=True)
    if not usable:
        seen = ", ".join(f"{p} ({m})" for m, p in found) or "none"
        raise ToolError(
            f"{name} of PostgreSQL {min_major} or newer is needed (an older one refuses newer servers); "
            f"found: {seen}. Set PGU_PG_BIN_DIRS to the bin directory of a newer PostgreSQL."
        )
    return usable[0][1]
