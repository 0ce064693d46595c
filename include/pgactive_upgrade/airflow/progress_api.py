"""The upgrade's Progress query (the PRD's `Progress`) and the upgrades page in the Airflow UI, mounted by the plugin
(plugins/pgactive_upgrade_progress.py).

- GET /pgactive-upgrade/progress/{source_instance}: JSON from the record each step keeps.
- GET /pgactive-upgrade/ui: the page (upgrades in flight and recent ones), shown in the UI's menu under Browse.

Both need the auth manager's permission to read runs of the upgrade DAG (Airflow's own `get_user` and
`requires_access_dag`): 401 without a token or session cookie, 403 with an invalid, expired or revoked one or
without that permission. A grant is remembered for GRANT_CACHE_SECONDS per token and DAG (never past the token's
expiry; a refusal is never remembered): a token revoked or a permission withdrawn is refused at most that long after.
A source that is not an RDS identifier gets 422 naming `source_instance`. The progress answer is read once per
RECORD_CACHE_SECONDS and source, in one query of the metadata database, and shared by every request meanwhile: many
dashboards polling cost one read a second, and a new record is answered at most that long after it was written
(RECORD_REFRESH_GRACE_SECONDS more while the next read runs: the previous answer is given meanwhile, nobody waits).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from typing import Annotated, Any
from collections.abc import Callable

from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import bearer_scheme, get_user, requires_access_dag
import httpx
import jwt
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import AfterValidator
from sqlalchemy import select

from pgactive_upgrade import audit, config, progress
from pgactive_upgrade.airflow import progress_page

RECORD_CACHE_SECONDS = 1.0
RECORD_REFRESH_GRACE_SECONDS = 0.25
GRANT_CACHE_SECONDS = 1.0
RECENT_UPGRADES = 20

app = FastAPI(title="pgactive upgrade progress")
_check_dag_run_read = requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=progress_page.UPGRADE_DAG_ID)


class RecentGrants:
    """Tokens just allowed to read a DAG's runs: (token digest, dag id) -> until when (monotonic)."""

    def __init__(self, seconds: float, max_keys: int = 4096):
        self.seconds, self.max_keys = seconds, max_keys
        self._until: dict[tuple[bytes, str], float] = {}

    @staticmethod
    def key(token: str, dag_id: str) -> tuple[bytes, str]:
        return hashlib.sha256(token.encode()).digest(), dag_id

    def granted(self, key: tuple[bytes, str]) -> bool:
        until = self._until.get(key)
        return until is not None and time.monotonic() < until

    def grant(self, key: tuple[bytes, str], token_expires_at: float | None) -> None:
        now = time.monotonic()
        until = now + self.seconds
        if token_expires_at is not None:
            until = min(until, now + token_expires_at - time.time())
        if len(self._until) >= self.max_keys:
            self._until.clear()
        self._until[key] = until


recent_grants = RecentGrants(GRANT_CACHE_SECONDS)


async def _may_read_upgrade_runs(
    request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Airflow's own checks (the user from the token: signature, expiry, revocation; then the auth manager's DAG-run
    read permission), skipped for GRANT_CACHE_SECONDS after they allowed this token: a dashboard polling many times a
    second pays neither the revocation query nor a worker thread on each request. Concurrent requests with the same
    token wait for one check (when a grant lapses, 20 clients in flight cost one check, not 20). On the event loop."""
    token = bearer.credentials if bearer and bearer.scheme.lower() == "bearer" else \
        request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    if not token:
        await _airflow_checks(request, bearer)  # 401
        return
    key = RecentGrants.key(token, progress_page.UPGRADE_DAG_ID)
    if recent_grants.granted(key):
        return
    check = _checks_in_flight.get(key)
    if check is None:
        check = asyncio.ensure_future(_check_and_grant(request, bearer, token, key))
        _checks_in_flight[key] = check
        check.add_done_callback(lambda done: _check_done(key, done))
    await asyncio.shield(check)


def _check_done(key: tuple[bytes, str], check: asyncio.Future) -> None:
    _checks_in_flight.pop(key, None)
    if not check.cancelled():
        check.exception()  # retrieved: a refusal whose askers all went away is not logged as unhandled


_checks_in_flight: dict[tuple[bytes, str], asyncio.Future] = {}


async def _check_and_grant(request: Request, bearer: HTTPAuthorizationCredentials | None, token: str,
                           key: tuple[bytes, str]) -> None:
    await _airflow_checks(request, bearer)
    recent_grants.grant(key, _expiry(token))


async def _airflow_checks(request: Request, bearer: HTTPAuthorizationCredentials | None) -> None:
    user = await get_user(request, None, bearer)
    await run_in_threadpool(_check_dag_run_read, request, user)


def _expiry(token: str) -> float | None:
    """The `exp` claim of a token Airflow has just validated (its signature was checked there)."""
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(exp) if exp is not None else None


may_read_upgrade_runs = Depends(_may_read_upgrade_runs)


def _rds_identifier(value: str) -> str:
    if not re.match(config.RDS_IDENTIFIER, value):
        raise ValueError(f"source_instance: expected {config.PATTERN_HINTS[config.RDS_IDENTIFIER]}")
    return value


# The pattern has a look-ahead, which pydantic's own regex engine refuses: checked by a validator instead.
SourceInstance = Annotated[str, Path(max_length=63, description="the upgrade's source: an RDS instance identifier"),
                           AfterValidator(_rds_identifier)]


class RecentReads:
    """Each key read at most once per `seconds`; concurrent misses of one key wait for a single read. While that read
    runs, other askers get the previous value if it is less than `seconds + grace` old, instead of queueing behind it:
    a value is never answered more than `seconds + grace` after the read that got it began."""

    def __init__(self, seconds: float, grace: float = 0.0, max_keys: int = 1024):
        self.seconds, self.grace, self.max_keys = seconds, grace, max_keys
        self._values: dict[str, tuple[float, Any]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._reading: set[str] = set()
        self._guard = threading.Lock()

    def peek(self, key: str) -> tuple[Any] | None:
        """(value,) while the last read is fresh, or within the grace while another caller reads it again; else None,
        and the caller is the one to read (through `get`). No waiting: an async handler's fast path."""
        hit = self._values.get(key)
        if hit is None:
            return None
        age = time.monotonic() - hit[0]
        if age < self.seconds:
            return (hit[1],)
        with self._guard:
            if age < self.seconds + self.grace and key in self._reading:
                return (hit[1],)
            self._reading.add(key)
            return None

    def get(self, key: str, read: Callable[[], Any]) -> Any:
        try:
            if (value := self._fresh(key)) is not None:
                return value[0]
            with self._lock(key):
                if (value := self._fresh(key)) is not None:
                    return value[0]
                with self._guard:
                    self._reading.add(key)
                began = time.monotonic()
                result = read()
                if len(self._values) >= self.max_keys:
                    self._values.clear()
                self._values[key] = (began, result)
                return result
        finally:
            with self._guard:
                self._reading.discard(key)

    def _fresh(self, key: str) -> tuple[Any] | None:
        hit = self._values.get(key)
        return (hit[1],) if hit and time.monotonic() - hit[0] < self.seconds else None

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            if len(self._locks) >= self.max_keys:
                self._locks.clear()
            return self._locks.setdefault(key, threading.Lock())


recent_reads = RecentReads(RECORD_CACHE_SECONDS, RECORD_REFRESH_GRACE_SECONDS)


@app.get("/progress/{source_instance}", dependencies=[may_read_upgrade_runs])
async def read_progress(source_instance: SourceInstance) -> Response:
    """The answer's bytes are what is shared: a request within RECORD_CACHE_SECONDS of the last read, or within
    RECORD_REFRESH_GRACE_SECONDS more while another request reads the record again, costs no query, no encoding and no
    worker thread (the authorization still runs for every request)."""
    source = source_instance.lower()
    hit = recent_reads.peek(source)
    status, body = hit[0] if hit else await run_in_threadpool(recent_reads.get, source, lambda: _progress_answer(source))
    return Response(content=body, status_code=status, media_type="application/json")


def _progress_answer(source: str) -> tuple[int, bytes]:
    record, halt = _read_record_and_halt(source)
    if record is None:
        return 404, json.dumps({"detail": f"no upgrade of {source!r} is recorded"}).encode()
    return 200, json.dumps({
        "source_instance": source,
        "dag_id": record["dag_id"],
        "run_id": record["run_id"],
        "phase": record.get("phase") or record.get("step"),
        "step": record.get("step"),
        "state": record.get("state"),
        "run_state": record.get("run_state"),  # running, awaiting_input, success, failed, halted
        "failed_task": record.get("failed_task"),
        "error": record.get("error"),
        "pending_gate": record.get("pending_gate"),
        "gates": record.get("gates") or [],
        "percent": record.get("percent"),
        "split": record.get("split"),
        "replicationLagBytes": record.get("replication_lag_bytes"),
        "lag_measured_at": record.get("lag_measured_at"),
        "write_unavailable_ms": record.get("write_unavailable_ms"),
        "updated_at": record.get("updated_at"),
        "halted": halt if halt and halt.get("run_id") == record["run_id"] else None,
    }).encode()


@app.get("/ui", response_class=HTMLResponse, dependencies=[may_read_upgrade_runs])
def upgrades_page(request: Request) -> HTMLResponse:
    base_url = str(request.scope.get("root_path", "")).removesuffix("/pgactive-upgrade")
    return HTMLResponse(progress_page.render(_read_upgrades(), base_url=base_url))


def _read_record_and_halt(source: str) -> tuple[dict | None, dict | None]:
    """Both Variables in one query of the metadata database (where Variable.set keeps them)."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    keys = {progress.record_key(source): "record", progress.halt_key(source): "halt"}
    found: dict[str, dict] = {}
    with create_session() as session:
        for variable in session.scalars(select(Variable).where(Variable.key.in_(list(keys)))):
            found[keys[variable.key]] = json.loads(variable.val)
    return found.get("record"), found.get("halt")


def _read_upgrades() -> list[progress_page.Upgrade]:
    """Every recorded upgrade: the runs still going, and the RECENT_UPGRADES last updated of the others."""
    from airflow.models.dagrun import DagRun
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    with create_session() as session:
        variables = {v.key: v.val for v in session.scalars(
            select(Variable).where(Variable.key.like(f"{progress.RECORD_PREFIX}%")))}
        records = {source: json.loads(value) for key, value in variables.items()
                   if (source := progress.source_of_record_key(key))}
        run_ids = [r.get("run_id") for r in records.values()]
        run_states: dict[str, str] = dict(session.execute(
            select(DagRun.run_id, DagRun.state).where(DagRun.dag_id == progress_page.UPGRADE_DAG_ID,
                                                      DagRun.run_id.in_(run_ids))).all())
        gates = _pending_gates(session, run_ids)
    upgrades = [
        progress_page.Upgrade(
            source=source, record=record, run_state=_state(run_states.get(record.get("run_id"))),
            gates=gates.get(record.get("run_id"), []),
            halt=_halt_of(variables.get(progress.halt_key(source)), record.get("run_id")))
        for source, record in records.items()
    ]
    finished = sorted((u for u in upgrades if not u.in_flight), key=lambda u: u.record.get("updated_at") or "",
                      reverse=True)
    return [u for u in upgrades if u.in_flight] + finished[:RECENT_UPGRADES]


def _pending_gates(session, run_ids: list[str]) -> dict[str, list[progress_page.Gate]]:
    """Human-in-the-loop requests of these runs nobody answered yet (what the REST API's hitlDetails lists)."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance

    rows = session.execute(
        select(TaskInstance.run_id, TaskInstance.task_id, TaskInstance.map_index, HITLDetail.subject,
               HITLDetail.options, HITLDetail.created_at)
        .join(HITLDetail, HITLDetail.ti_id == TaskInstance.id)
        .where(TaskInstance.dag_id == progress_page.UPGRADE_DAG_ID, TaskInstance.run_id.in_(run_ids),
               HITLDetail.responded_at.is_(None))
    ).all()
    gates: dict[str, list[progress_page.Gate]] = {}
    for run_id, task_id, map_index, subject, options, created_at in rows:
        gates.setdefault(run_id, []).append(progress_page.Gate(
            task_id=task_id, map_index=map_index, subject=subject, options=list(options or []),
            created_at=created_at.isoformat() if created_at else ""))
    return gates


def _state(state) -> str | None:
    return getattr(state, "value", state)


def _halt_of(raw: str | None, run_id: str | None) -> dict | None:
    halt = json.loads(raw) if raw else None
    return halt if halt and halt.get("run_id") == run_id else None


@app.get("/audit/{source_instance}", dependencies=[may_read_upgrade_runs])
def read_audit(source_instance: SourceInstance, request: Request) -> dict:
    """Who triggered the upgrade, answered its gates, rolled it back and why, cleared or marked its tasks. Read through
    this api-server's own REST API with the caller's credentials, so Airflow's permissions on runs, variables and the
    audit log apply to the caller."""
    token = request.headers.get("authorization") or f"Bearer {request.cookies.get('_token', '')}"
    base = str(request.url.replace(path="/api/v2/", query=""))
    with httpx.Client(base_url=base, headers={"Authorization": token}, timeout=30) as client:
        def get(path: str, params: dict | None) -> dict:
            answer = client.get(path, params=params)
            if answer.status_code == 404:
                raise LookupError(path)
            answer.raise_for_status()
            return answer.json()

        try:
            return audit.upgrade_audit(get, source_instance.lower())
        except audit.NoUpgradeRecorded as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        except httpx.HTTPStatusError as error:
            raise HTTPException(status_code=error.response.status_code, detail=f"reading {error.request.url.path}: "
                                f"{error.response.status_code}") from None
