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
import os, sys
import pgactive_upgrade.airflow.preload

def forked(probe):
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

print(forked(probe))
with open(pgactive_upgrade.plan.__file__, "a") as plan_file:  # a new version deployed, nothing restarted
    plan_file.write("\\nNEW_VERSION = 2\\n")
print(forked(probe))
print(repr(probe()))
"""


def test_a_process_forked_after_the_package_changed_imports_the_new_version(tmp_path):
    """The preload holds the package's own code, yet a new version of it needs no restart: every process forked after
    a file changed forgets the preloaded package (own_code.py). On a copy of the package, changed between forks."""
    shutil.copytree(REPO / "include" / "pgactive_upgrade", tmp_path / "pgactive_upgrade")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", CHANGED_CODE], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path, timeout=120)
    before, after, preloading_process = out.stdout.strip().splitlines()[-3:]
    assert before == "(True, None)", "unchanged: the forked process keeps the preloaded package"
    assert after == "(False, 2)", "changed: the forked process imports the new version"
    assert preloading_process == "(True, None)", "the preloading process itself keeps what it imported"


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
