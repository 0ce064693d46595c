"""The upgrade's Progress query (the PRD's `Progress`): GET /pgactive-upgrade/progress/{source_instance}.

Answers from the record each step keeps (phase, percent, split, state), so it costs one metadata
read, well under a second. Authenticated like the REST API: a request without a valid token gets 401.
"""

from __future__ import annotations

import json

from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.models import Variable
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException

from pgactive_upgrade import progress

app = FastAPI(title="pgactive upgrade progress")


@app.get("/progress/{source_instance}")
def read_progress(source_instance: str, user: GetUserDep) -> dict:
    raw = Variable.get(progress.record_key(source_instance), default_var=None)
    if raw is None:
        raise HTTPException(status_code=404, detail=f"no upgrade of {source_instance!r} is recorded")
    record = json.loads(raw)
    halt = Variable.get(progress.halt_key(source_instance), default_var=None)
    return {
        "source_instance": source_instance,
        "dag_id": record["dag_id"],
        "run_id": record["run_id"],
        "phase": record.get("phase") or record.get("step"),
        "step": record.get("step"),
        "state": record.get("state"),
        "percent": record.get("percent"),
        "split": record.get("split"),
        "replicationLagBytes": record.get("replication_lag_bytes"),
        "lag_measured_at": record.get("lag_measured_at"),
        "updated_at": record.get("updated_at"),
        "halted": json.loads(halt) if halt and json.loads(halt).get("run_id") == record["run_id"] else None,
    }


class PgactiveUpgradeProgressPlugin(AirflowPlugin):
    name = "pgactive_upgrade_progress"
    fastapi_apps = [{"app": app, "url_prefix": "/pgactive-upgrade", "name": "pgactive upgrade progress"}]


# --- Audit trail (issue 10: gates and audit) ------------------------------------------------------------------------
# GET /pgactive-upgrade/audit/{source_instance}: who triggered the upgrade, answered its gates, rolled it back and why,
# cleared or marked its tasks. Read through this api-server's own REST API with the caller's credentials, so Airflow's
# permissions on runs, variables and the audit log apply to the caller.
import re  # noqa: E402

import httpx  # noqa: E402
from fastapi import Request  # noqa: E402

from pgactive_upgrade import audit  # noqa: E402

_SOURCE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")


@app.get("/audit/{source_instance}")
def read_audit(source_instance: str, request: Request, user: GetUserDep) -> dict:
    if not _SOURCE.match(source_instance):
        raise HTTPException(status_code=422, detail="source_instance: expected an RDS instance identifier")
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
            raise HTTPException(status_code=404, detail=str(error))
        except httpx.HTTPStatusError as error:
            raise HTTPException(status_code=error.response.status_code, detail=f"reading {error.request.url.path}: "
                                f"{error.response.status_code}")
