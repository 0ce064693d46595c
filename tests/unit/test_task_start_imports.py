"""What a task process imports when it starts: every one loads every plugin (for their macros) and parses the DAG
file, so neither may pull in what only the API server needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def modules_added(prelude: str, statement: str) -> set[str]:
    """The modules `statement` imports in a fresh interpreter, after `prelude` (what the task process already has)."""
    script = (f"import sys, json\n{prelude}\nbefore = set(sys.modules)\n{statement}\n"
              "print(json.dumps(sorted(set(sys.modules) - before)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "include"), str(REPO / "plugins"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_loading_the_plugin_imports_neither_fastapi_nor_the_progress_api():
    added = modules_added("import airflow.plugins_manager", "import pgactive_upgrade_progress")
    assert "pgactive_upgrade_progress" in added
    heavy = sorted(m for m in added if m.split(".")[0] in ("fastapi", "starlette", "httpx", "jwt")
                   or m.startswith(("pgactive_upgrade.airflow.progress_api", "airflow.api_fastapi")))
    assert heavy == [], f"the plugin imports at task start: {heavy}"


STEP_IMPORTS = """
import importlib.util
spec = importlib.util.spec_from_file_location("dag_file", "dags/pgactive_rolling_upgrade.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import pgactive_upgrade.upgrade
from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.rds import RdsHook
from airflow.providers.postgres.hooks.postgres import PostgresHook
"""


def test_the_preload_module_holds_every_module_a_step_imports_while_it_parses_the_dag():
    """With the preload (README: a fleet of upgrades), a task process imports nothing to parse the DAG file: not the
    third-party modules, not the package's own code."""
    assert "pgactive_upgrade.upgrade" in modules_added("import airflow", STEP_IMPORTS), "the control, without it"
    added = modules_added("import pgactive_upgrade.airflow.preload", STEP_IMPORTS)
    others = sorted(m for m in added if m.split(".")[0] not in sys.stdlib_module_names)
    assert others == [], f"imported by a step although not preloaded: {others}"


CHANGED_CODE = """
import os, shutil, sys
import pgactive_upgrade.airflow.preload

def forked():
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(writer, repr(probe()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(writer)
    return os.read(reader, 1000).decode()

def probe():
    kept = "pgactive_upgrade.plan" in sys.modules
    import pgactive_upgrade.plan
    return kept, getattr(pgactive_upgrade.plan, "NEW_VERSION", None)

plan = pgactive_upgrade.plan.__file__
print(forked())
shutil.copy(plan, plan + ".new")
os.replace(plan + ".new", plan)  # the same content in a new file (a git-sync swap): nothing changed
print(forked())
status = os.stat(plan)
with open(plan, "r+") as plan_file:  # a new version of the same size and mtime (rsync --inplace -t)
    text = plan_file.read()
    plan_file.seek(0)
    plan_file.write(text[:-17] + "\\nNEW_VERSION = 2\\n")
os.utime(plan, ns=(status.st_atime_ns, status.st_mtime_ns))
print(forked())
print(repr(probe()))
"""


def test_a_process_forked_after_the_package_changed_imports_the_new_version(tmp_path):
    """The preload holds the package's own code, yet a new version of it needs no restart: every process forked after
    a file changed forgets the preloaded package (own_code.py). On a copy of the package, changed between forks."""
    shutil.copytree(REPO / "include" / "pgactive_upgrade", tmp_path / "pgactive_upgrade")
    plan = tmp_path / "pgactive_upgrade" / "plan.py"
    plan.write_text(plan.read_text() + "\n" + "#" * 40 + "\n")  # room for the same-size change
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", CHANGED_CODE], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path, timeout=120)
    unchanged, same_content, new_version, preloading_process = out.stdout.strip().splitlines()[-4:]
    assert unchanged == "(True, None)", "unchanged: the forked process keeps the preloaded package"
    assert same_content == "(True, None)", "a new file with the same content changes nothing"
    assert new_version == "(False, 2)", "changed, even with the same size and mtime: the new version is imported"
    assert preloading_process == "(True, None)", "the preloading process itself keeps what it imported"


SWAPPED_LINK = """
import os, sys
import pgactive_upgrade.airflow.preload

reader, writer = os.pipe()
os.replace(sys.argv[1], sys.argv[2])  # git-sync: the link now leads to the new version; the old one stays on disk
if os.fork() == 0:
    import pgactive_upgrade.plan
    os.write(writer, repr(getattr(pgactive_upgrade.plan, "NEW_VERSION", None)).encode())
    os._exit(0)
os.wait()
print(os.read(reader, 100).decode())
"""


def test_a_process_forked_after_a_git_sync_swap_imports_the_version_the_link_leads_to(tmp_path):
    """Deployed by swapping a symlink (git-sync), the old version still on disk: the package is compared through the
    path it was imported by, so the new version is seen."""
    for version in ("v1", "v2"):
        shutil.copytree(REPO / "include" / "pgactive_upgrade", tmp_path / version / "pgactive_upgrade")
    plan = tmp_path / "v2" / "pgactive_upgrade" / "plan.py"
    plan.write_text(plan.read_text() + "\nNEW_VERSION = 2\n")
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    (tmp_path / "next").symlink_to(tmp_path / "v2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "current"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", SWAPPED_LINK, str(tmp_path / "next"), str(tmp_path / "current")],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_a_preload_that_fails_half_way_keeps_none_of_the_modules_it_got_through(tmp_path):
    """A deploy half done when the scheduler starts: the preload must not keep the modules it got through."""
    shutil.copytree(REPO / "include" / "pgactive_upgrade", tmp_path / "pgactive_upgrade")
    gates = tmp_path / "pgactive_upgrade" / "airflow" / "gates.py"
    gates.write_text(gates.read_text() + "\nimport a_module_the_new_version_needs_but_is_not_there_yet\n")
    script = ("import sys, pgactive_upgrade.airflow.preload\n"
              "print(sorted(m for m in sys.modules if m.startswith('pgactive_upgrade.')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not preloaded, each task process imports it" in out.stderr
    preloading_process_holds = out.stdout.strip().splitlines()[-1]
    assert preloading_process_holds == repr(["pgactive_upgrade.airflow", "pgactive_upgrade.airflow.own_code",
                                              "pgactive_upgrade.airflow.preload"]), "only the preload itself"


def test_the_preload_maps_loaded_modules_to_files_for_the_aws_hooks_caller_lookup():
    """The AWS hooks name their caller by walking the stack; the walk's module map is made once, in the preload."""
    script = ("import inspect, botocore.session, pgactive_upgrade.airflow.preload\n"
              "print(inspect.getabsfile(botocore.session) in inspect.modulesbyfile)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "include")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_the_preload_freezes_what_it_made_so_task_processes_never_collect_it():
    """Airflow freezes the scheduler's objects before it forks workers itself; from a forkserver the preload must:
    otherwise every task process's full garbage collection walks the whole preloaded heap."""
    script = ("import gc, pgactive_upgrade.airflow.preload\n"
              "print(gc.get_freeze_count(), len(gc.get_objects()))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "include")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=120)
    frozen, collectable = map(int, out.stdout.strip().splitlines()[-1].split())
    assert frozen > 100_000 and collectable < frozen // 100, (frozen, collectable)
