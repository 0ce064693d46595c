"""A real local Airflow 3.3 (api-server, scheduler, triggerer, dag-processor) for the demo and tests.

By default: SQLite and the LocalExecutor. Options for the scale-out path: a PostgreSQL metadata database
(``metadata_db``, see topology.airflow_metadb) and, on it, the Celery executor (``celery_broker_port``): our own
Redis (topology.redis) in ``<home>/redis`` as the broker, the result backend on the metadata database, and an
``airflow celery worker`` managed like the other components; Redis stops with the rest.

Each component runs as a background process in its own session, with a pidfile ("pid start-time")
and a log file in ``<home>/run/``; everything a component starts (executor workers, task processes,
trigger runners) stays in that session, which is how stop() finds it. Never import airflow here (it would read the
caller's configuration): the REST API is driven with the official client, apache-airflow-client.

CLI: python -m topology.airflow_local start|stop|status --home .local/demo/airflow --port 25480
"""

from __future__ import annotations

import argparse
import compileall
import json
import logging
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import NamedTuple

from airflow_client.client import ApiClient, Configuration, DagRunApi, TaskInstanceApi, TriggerDAGRunPostBody
from airflow_client.client.exceptions import ApiException

from topology.redis import RedisServer

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN_USER = "admin"
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],  # --port appended at start
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
}
CELERY_WORKER = "celery-worker"
CELERY_WORKER_ARGV = ["celery", "worker", "--skip-serve-logs", "--concurrency", "4"]
HEALTH_KEYS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
FINAL_RUN_STATES = {"success", "failed"}
# Task log events that exist only when a task really went through state "deferred" (see saw_deferred).
TASK_DEFERRED_EVENT = "Pausing task as DEFERRED"
TRIGGER_STARTING_EVENT = re.compile(r"^trigger .+ \(ID \d+\) starting$")
STOP_GRACE_SECONDS = 15.0
# README "A fleet of upgrades on one Airflow": the LocalExecutor's workers start from a forkserver that has imported
# what every step needs (include/pgactive_upgrade/airflow/preload.py), and AWS sessions share botocore's data parsed
# there (include/pgactive_upgrade/airflow/aws_session.py); each task process inherits both.
FLEET_SETTINGS = {
    "AIRFLOW__SCHEDULER__MP_START_METHOD": "forkserver",
    "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD": "pgactive_upgrade.airflow.preload",
    "AIRFLOW__AWS__SESSION_FACTORY": "pgactive_upgrade.airflow.aws_session.SharedDataSessionFactory",
}
TASK_GRACE_SECONDS = 5.0


def compile_bytecode(repo: Path) -> None:
    """As a deployment image is built (README): task processes then read bytecode, not source."""
    for folder in ("include", "dags", "plugins"):
        compileall.compile_dir(repo / folder, quiet=1)
SQLITE_LOCK_TIMEOUT = 30
# Set only by us and inherited by every child: finds stray processes of this instance at stop().
INSTANCE_MARKER = "TOPOLOGY_LOCAL_AIRFLOW_HOME"


class AirflowApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class PostgresMetadataDb:
    host: str
    port: int
    dbname: str
    user: str
    password: str = field(repr=False)

    def url(self, scheme: str = "postgresql+psycopg2") -> str:
        credentials = f"{_q(self.user)}:{_q(self.password)}"
        return f"{scheme}://{credentials}@{self.host}:{self.port}/{_q(self.dbname)}"


class LocalAirflow:
    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        plugins_folder: Path,
        port: int,
        extra_env: dict[str, str] | None = None,
        python_paths: Iterable[Path] = (),
        metadata_db: PostgresMetadataDb | None = None,
        celery_broker_port: int | None = None,
    ):
        if celery_broker_port and not metadata_db:
            raise ValueError("the Celery executor keeps its results in the metadata database: give metadata_db too")
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.plugins_folder = Path(plugins_folder).resolve()
        self.port = port
        self.extra_env = dict(extra_env or {})
        self.python_paths = [Path(p).resolve() for p in python_paths]
        self.run_dir = self.home / "run"
        self._token: str | None = None
        self._token_time = 0.0
        self._processes: list[subprocess.Popen] = []
        self.metadata_db = metadata_db
        # Always known, so stop() finds a broker started earlier; started only with celery_broker_port.
        self.redis = RedisServer(self.home / "redis", celery_broker_port or 0)
        self.celery = bool(celery_broker_port)

    # ----- properties -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def username(self) -> str:
        return ADMIN_USER

    @property
    def password(self) -> str:
        return json.loads(self.passwords_file.read_text())[ADMIN_USER]

    @property
    def passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    @property
    def sqlite_path(self) -> Path:
        return self.home / "airflow.db"

    def log_path(self, component: str) -> Path:
        return self.run_dir / f"{component}.log"

    def pid_path(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    @property
    def components(self) -> dict[str, list[str]]:
        """What start() runs: the four components, plus the Celery worker with the Celery executor."""
        return {**COMPONENTS, CELERY_WORKER: CELERY_WORKER_ARGV} if self.celery else dict(COMPONENTS)

    @staticmethod
    def _any_component() -> list[str]:
        """Every component an earlier start may have left a pidfile for (stop() ends them all)."""
        return [*COMPONENTS, CELERY_WORKER]

    # ----- environment ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment of every component (and of `airflow` CLI calls made by this class)."""
        inherited = {
            key: value for key, value in os.environ.items()
            if not key.startswith("AIRFLOW__") and key not in ("AIRFLOW_HOME", INSTANCE_MARKER)
        }
        venv_bin = str(Path(sys.executable).parent)
        python_path = [str(p) for p in self.python_paths]
        if inherited.get("PYTHONPATH"):
            python_path.append(inherited["PYTHONPATH"])
        env = {
            **inherited,
            "PATH": venv_bin + os.pathsep + inherited.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(python_path),
            "AIRFLOW_HOME": str(self.home),
            INSTANCE_MARKER: str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret(),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
            "AIRFLOW__CORE__PARALLELISM": "8",  # LocalExecutor forks this many workers up front
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        }
        env.update(self._database_env())
        env.update(self._executor_env())
        env.update(self.extra_env)
        return env

    def _database_env(self) -> dict[str, str]:
        if self.metadata_db:
            return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_db.url()}
        # Four processes write to SQLite: wait for locks longer than the 5 s default.
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.sqlite_path}?timeout={SQLITE_LOCK_TIMEOUT}"}

    def _executor_env(self) -> dict[str, str]:
        if not self.celery:
            return {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}
        return {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": self.redis.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": self.metadata_db.url("db+postgresql+psycopg2"),
        }

    def _jwt_secret(self) -> str:
        # Stable across restarts so tokens and running task identities stay valid.
        path = self.home / "jwt_secret"
        if not path.exists():
            _write_private(path, secrets.token_urlsafe(64))
        return path.read_text().strip()

    def _seed_admin_password(self) -> None:
        # Airflow prints a password it generates itself into the api-server log; a password we
        # write first is used as is and never printed.
        if not self.passwords_file.exists():
            _write_private(self.passwords_file, json.dumps({ADMIN_USER: secrets.token_urlsafe(24)}) + "\n")

    # ----- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> LocalAirflow:
        if self._all_alive() and self._healthy() and self._answers_with_our_password():
            return self
        self.stop()
        self._ensure_port_free()
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._seed_admin_password()
        if self.celery:
            self.redis.ensure_running()
        self._migrate_db_once()
        spawned_at = datetime.now(UTC)
        for component in self.components:
            self._spawn(component)
        try:
            self._wait_healthy(timeout, since=spawned_at)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process of the instance; idempotent.

        SIGTERM to the scheduler, triggerer, dag-processor and everything they started (running
        tasks too: the scheduler waits for them). A task process only runs on_kill() on SIGTERM
        and keeps going (Airflow itself SIGKILLs it 5 s later), so what is left of the children
        after TASK_GRACE_SECONDS gets SIGKILL. The api-server goes last because task processes
        report their end through it. SIGKILL for anything left after STOP_GRACE_SECONDS. The Celery
        worker counts as one of the first group; its broker (Redis) stops last.
        """
        sessions = {c: pid for c in self._any_component() if (pid := self._read_pid(c))}
        api_session = {sessions.pop("api-server")} if "api-server" in sessions else set()
        worker_sessions = set(sessions.values())
        leaders = worker_sessions | api_session

        self._terminate(worker_sessions, signal.SIGTERM, TASK_GRACE_SECONDS)
        children = [pid for pid in self._stray_processes(worker_sessions) if pid not in leaders]
        self._signal_each(children, signal.SIGKILL, "task grace")
        _wait_until(lambda: not self._stray_processes(worker_sessions), STOP_GRACE_SECONDS)
        self._terminate(worker_sessions | api_session, signal.SIGTERM, STOP_GRACE_SECONDS)
        self._terminate(worker_sessions | api_session, signal.SIGKILL, 5, reason="stop grace")

        self._reap_children()
        self.redis.stop()
        for component in self._any_component():
            self.pid_path(component).unlink(missing_ok=True)
        self._token = None

    def _terminate(self, sessions: set[int], sig: int, wait: float, reason: str = "") -> None:
        started = time.monotonic()
        self._signal_each(self._stray_processes(sessions), sig, reason)
        _wait_until(lambda: not self._stray_processes(sessions), wait)
        log.debug("signal %s to sessions %s: %.1fs", sig, sorted(sessions), time.monotonic() - started)

    @staticmethod
    def _signal_each(pids: list[int], sig: int, reason: str = "") -> None:
        for pid in pids:
            if sig == signal.SIGKILL:
                log.info("SIGKILL %s (%s) after %s", pid, _cmdline(pid), reason)
            _kill(pid, sig)

    def kill(self, component: str) -> list[int]:
        """SIGKILL a component and everything in its session (for the scheduler: the running tasks too), as a
        crashed host would; returns the pids killed."""
        pid = self._read_pid(component)

        def in_session() -> list[int]:
            return [p for p in _all_pids() if (stat := _proc_stat(p)) and stat.state != "Z" and stat.session == pid]

        victims = in_session() if pid else []
        self._signal_each(victims, signal.SIGKILL, f"{component} killed on purpose")
        _wait_until(lambda: not in_session(), 10)
        self._reap_children()
        return victims

    def restart(self, *components: str, timeout: float = 60) -> None:
        """Start components again (after kill) and wait until all are alive and the api-server says healthy."""
        since = datetime.now(UTC)
        for component in components:
            self._spawn(component)
        self._wait_healthy(timeout, since=since)

    def processes(self) -> list[int]:
        """Live processes of this instance: the components and everything they started."""
        sessions = {pid for c in self._any_component() if (pid := self._read_pid(c))}
        return self._stray_processes(sessions)

    def status(self) -> dict:
        components = {}
        for component in self.components:
            pid = self._read_pid(component)
            components[component] = {"pid": pid, "alive": self._leader_alive(component)}
        api_alive = components["api-server"]["alive"]
        return {"url": self.url, "components": components, "health": self._health() if api_alive else None}

    def _migrate_db_once(self) -> None:
        """SQLite: once per home. PostgreSQL: at every start (the database may have been reset apart from the
        home; migrating a current database is a no-op)."""
        marker = self.run_dir / "db_migrated"
        if marker.exists() and self.sqlite_path.exists() and not self.metadata_db:
            return
        with open(self.run_dir / "db-migrate.log", "ab") as log_file:
            subprocess.run(
                ["airflow", "db", "migrate"], env=self.env(), stdout=log_file, stderr=subprocess.STDOUT,
                check=True, cwd=self.home, timeout=600,
            )
        if not self.metadata_db:
            _use_write_ahead_log(self.sqlite_path)
        marker.write_text("ok\n")

    def _spawn(self, component: str) -> None:
        argv = ["airflow", *self.components[component]]
        if component == "api-server":
            argv += ["--port", str(self.port)]
        with open(self.log_path(component), "ab") as log_file:
            process = subprocess.Popen(
                argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=self.home, start_new_session=True,
            )
        self._processes.append(process)
        stat = _proc_stat(process.pid)
        self.pid_path(component).write_text(f"{process.pid} {stat.start_time if stat else 0}\n")

    def _wait_healthy(self, timeout: float, since: datetime) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [c for c in self.components if not self._leader_alive(c)]
            if dead:
                raise RuntimeError(f"Airflow component(s) {dead} exited during start\n{self._log_tails(dead)}")
            if self._healthy(since) and self._answers_with_our_password():
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"Airflow not healthy after {timeout}s: {self._health()}\n{self._log_tails(list(self.components))}"
        )

    def _health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=3) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def _healthy(self, since: datetime | None = None) -> bool:
        """All components report healthy; with `since`, their heartbeats are newer than that
        (heartbeats of a previous start stay "healthy" for 30 s after it stopped)."""
        health = self._health()
        if not health or any((health.get(key) or {}).get("status") != "healthy" for key in HEALTH_KEYS):
            return False
        if since is None:
            return True
        heartbeats = [
            value for key in HEALTH_KEYS for name, value in (health.get(key) or {}).items()
            if name.startswith("latest_") and name.endswith("_heartbeat")
        ]
        return len(heartbeats) == len(HEALTH_KEYS) - 1 and all(
            datetime.fromisoformat(heartbeat) > since for heartbeat in heartbeats
        )

    def _answers_with_our_password(self) -> bool:
        """The API on our port is this instance's (another home has another admin password)."""
        self._token = None
        try:
            self.token()
            return True
        except (AirflowApiError, OSError, ValueError, KeyError):
            return False

    def _all_alive(self) -> bool:
        alive = all(self._leader_alive(c) for c in self.components)
        return alive and (self.redis.is_running() or not self.celery)

    def _ensure_port_free(self) -> None:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as error:
                raise RuntimeError(f"port {self.port} is in use by another process") from error

    def _read_pid(self, component: str) -> int | None:
        try:
            return int(self.pid_path(component).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _leader_alive(self, component: str) -> bool:
        """Alive and the very process we started (pidfile holds pid and start time: no pid reuse)."""
        try:
            pid, start_time = (int(x) for x in self.pid_path(component).read_text().split()[:2])
        except (OSError, ValueError):
            return False
        stat = _proc_stat(pid)
        return bool(stat) and stat.state != "Z" and stat.start_time == start_time

    def _stray_processes(self, sessions: set[int]) -> list[int]:
        """Live processes of our components' sessions (task processes change process group, not
        session), plus anything else carrying our environment marker."""
        found = []
        for pid in _all_pids():
            stat = _proc_stat(pid)
            if not stat or stat.state == "Z" or pid == os.getpid():
                continue
            if stat.session in sessions or _environ_of(pid).get(INSTANCE_MARKER) == str(self.home):
                found.append(pid)
        return found

    def _reap_children(self) -> None:
        for process in self._processes:
            process.poll()
        self._processes = [p for p in self._processes if p.returncode is None]

    def _log_tails(self, components: list[str], lines: int = 30) -> str:
        parts = []
        for component in components:
            path = self.log_path(component)
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # ----- REST API -----------------------------------------------------------------------------

    def token(self) -> str:
        if self._token and time.monotonic() - self._token_time < 3600:
            return self._token
        body = {"username": self.username, "password": self.password}
        response = self._request("POST", "/auth/token", body, token=None)
        self._token, self._token_time = response["access_token"], time.monotonic()
        return self._token

    @contextmanager
    def client(self) -> Iterator[ApiClient]:
        """The official REST client (apache-airflow-client), authenticated: use its typed APIs, e.g.
        ``with airflow.client() as client: DagRunApi(client).get_dag_run(dag_id, run_id)``. A refusal is raised as
        AirflowApiError, like every other call here."""
        with ApiClient(Configuration(host=self.url, access_token=self.token())) as client:
            try:
                yield client
            except ApiException as error:
                body = error.body.decode(errors="replace") if isinstance(error.body, bytes) else str(error.body)
                raise AirflowApiError("client", error.reason or "", error.status or 0, body) from None

    def token_for(self, username: str) -> str:
        """A fresh token of another SimpleAuthManager user (one listed in AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS,
        whose password the api-server generated into the passwords file)."""
        password = json.loads(self.passwords_file.read_text())[username]
        return self._request("POST", "/auth/token", {"username": username, "password": password}, token=None)["access_token"]

    def get(self, path: str, token: str | None) -> dict:
        """GET any path of the api-server (a plugin's too) with this token (None: without one)."""
        return self._request("GET", path, None, token=token)

    def api(self, method: str, path: str, json: dict | None = None) -> dict:
        """Authenticated call to /api/v2/<path> (path may include the prefix or not), through the official client's
        transport, for endpoints and bodies its typed APIs do not cover the way a test needs."""
        full_path = path if path.startswith("/api/v2/") else "/api/v2/" + path.lstrip("/")
        try:
            return self._request(method, full_path, json, token=self.token())
        except AirflowApiError as error:
            if error.status != 401:
                raise
            self._token = None
            return self._request(method, full_path, json, token=self.token())

    def _request(self, method: str, path: str, body: dict | None, token: str | None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with ApiClient(Configuration(host=self.url)) as client:
            response = client.call_api(method, self.url + path, header_params=headers, body=body,
                                       _request_timeout=30)
            raw = response.read()
        if response.status >= 400:
            raise AirflowApiError(method, path, response.status, raw.decode(errors="replace"))
        return _json_or_empty(raw)

    # ----- DAGs and runs ------------------------------------------------------------------------

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Wait until the DAG is parsed (reserializing once if it is slow), then unpause it."""
        deadline = time.monotonic() + timeout
        reserialize_at = time.monotonic() + min(15.0, timeout / 3)
        reserialized = False
        while not self._dag_known(dag_id):
            if time.monotonic() > deadline:
                errors = self.api("GET", "importErrors").get("import_errors", [])
                raise TimeoutError(f"DAG {dag_id!r} not parsed after {timeout}s; import errors: {errors}")
            if not reserialized and time.monotonic() > reserialize_at:
                self._reserialize()
                reserialized = True
            time.sleep(0.5)
        self.api("PATCH", f"dags/{_q(dag_id)}", {"is_paused": False})

    def _dag_known(self, dag_id: str) -> bool:
        try:
            self.api("GET", f"dags/{_q(dag_id)}")
            return True
        except AirflowApiError as error:
            if error.status == 404:
                return False
            raise

    def _reserialize(self) -> None:
        with open(self.run_dir / "reserialize.log", "ab") as log_file:
            subprocess.run(
                ["airflow", "dags", "reserialize"], env=self.env(), stdout=log_file, stderr=subprocess.STDOUT,
                cwd=self.home, timeout=300, check=False,
            )

    def trigger(self, dag_id: str, conf: dict, run_id: str | None = None) -> str:
        body = TriggerDAGRunPostBody(logical_date=None, conf=conf, dag_run_id=run_id)
        with self.client() as client:
            return DagRunApi(client).trigger_dag_run(dag_id, body).dag_run_id

    def run_state(self, dag_id: str, run_id: str) -> str:
        with self.client() as client:
            return DagRunApi(client).get_dag_run(dag_id, run_id).state.value

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float,
        on_poll: Callable[[list[dict]], None] | None = None,
        poll_interval: float = 0.5,
    ) -> str:
        """Poll until the run is success/failed; returns that state. on_poll gets the task instances."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.run_state(dag_id, run_id)
            if on_poll:
                on_poll(self.task_instances(dag_id, run_id))
            if state in FINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                states = {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}
                raise TimeoutError(f"run {dag_id}/{run_id} still {state} after {timeout}s: {states}")
            time.sleep(poll_interval)

    def task_instances(self, dag_id: str, run_id: str, page: int = 100) -> list[dict]:
        """Every task instance of the run, as the JSON the API sends."""
        items: list[dict] = []
        with self.client() as client:
            api = TaskInstanceApi(client)
            while True:
                answer = _raw(api.get_task_instances_without_preload_content(dag_id, run_id, limit=page, offset=len(items)))
                items += answer["task_instances"]
                if not answer["task_instances"] or len(items) >= answer["total_entries"]:
                    return items

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> list:
        with self.client() as client:
            answer = TaskInstanceApi(client).get_log_without_preload_content(
                dag_id, run_id, task_id, try_number, full_content=True, map_index=map_index, accept="application/json")
        return _raw(answer).get("content", [])

    def saw_deferred(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> bool:
        """Did this task instance go through state "deferred" (in any try)? Works after the fact.

        Once the task finished, the task instance row keeps no trace of a deferral (trigger_id and
        next_method are cleared, try_number does not move) and task instance history is written
        only on retries. Polling states can miss a short deferral. What stays is the task's log,
        served by the REST API: the task runner logs "Pausing task as DEFERRED." when it defers,
        and the triggerer writes "trigger <dag>/<run>/<task>/<map>/<try> (ID n) starting" into the
        same try's log (a separate .trigger.<job>.log file the API merges in).
        """
        return any(
            _is_deferral_entry(entry)
            for try_number in range(1, self._try_number(dag_id, run_id, task_id, map_index) + 1)
            for entry in self.task_log(dag_id, run_id, task_id, try_number, map_index)
        )

    def _try_number(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> int:
        with self.client() as client:
            api = TaskInstanceApi(client)
            if map_index >= 0:
                return api.get_mapped_task_instance(dag_id, run_id, task_id, map_index).try_number or 0
            return api.get_task_instance(dag_id, run_id, task_id).try_number or 0


# ----- helpers ----------------------------------------------------------------------------------


def _is_deferral_entry(entry) -> bool:
    event = str(entry.get("event", "")) if isinstance(entry, dict) else str(entry)
    return event.startswith(TASK_DEFERRED_EVENT) or bool(TRIGGER_STARTING_EVENT.match(event))


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _raw(response) -> dict:
    """The JSON body of a client call made `_without_preload_content` (the typed models drop null fields)."""
    if response.status >= 400:
        raise AirflowApiError("GET", response.geturl() or "", response.status, response.data.decode(errors="replace"))
    return _json_or_empty(response.data)


def _json_or_empty(raw: bytes) -> dict:
    return json.loads(raw) if raw.strip() else {}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


class _ProcStat(NamedTuple):
    state: str
    session: int
    start_time: int


def _proc_stat(pid: int) -> _ProcStat | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after "pid (comm)": state ppid pgrp session ... starttime is field 22 overall
    return _ProcStat(state=fields[0], session=int(fields[3]), start_time=int(fields[19]))


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _use_write_ahead_log(sqlite_path: Path) -> None:
    """WAL lets readers run while one process writes (the mode is stored in the database file)."""
    with sqlite3.connect(sqlite_path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _environ_of(pid: int) -> dict[str, str]:
    # Processes that call setproctitle (api-server, executor workers) overwrite this area.
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ----- CLI --------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m topology.airflow_local")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=REPO_ROOT / ".local/demo/airflow")
    parser.add_argument("--port", type=int, default=25480)
    parser.add_argument("--dags-folder", type=Path, default=REPO_ROOT / "dags")
    parser.add_argument("--plugins-folder", type=Path, default=REPO_ROOT / "plugins")
    parser.add_argument("--timeout", type=float, default=180)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    airflow = LocalAirflow(
        home=args.home, dags_folder=args.dags_folder, plugins_folder=args.plugins_folder, port=args.port,
        python_paths=[REPO_ROOT / "include", REPO_ROOT],
    )
    if args.command == "start":
        started = time.monotonic()
        airflow.start(timeout=args.timeout)
        print(f"Airflow healthy at {airflow.url} after {time.monotonic() - started:.1f}s "
              f"(user {airflow.username}, password in {airflow.passwords_file})")
    elif args.command == "stop":
        airflow.stop()
        print("Airflow stopped")
    else:
        status = airflow.status()
        print(json.dumps(status, indent=2))
        return 0 if all(c["alive"] for c in status["components"].values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
