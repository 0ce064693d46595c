"""The progress endpoint on a real local Airflow (its own, no upgrade run): every request is authorized, the path
parameter is validated, and a new record is answered within about a second although answers are shared.

The endpoint remembers a grant for GRANT_CACHE_SECONDS per token and DAG, and the record's answer for
RECORD_CACHE_SECONDS per source (RECORD_REFRESH_GRACE_SECONDS more while it is read again); these tests prove what
that may and may not hide."""

from __future__ import annotations

import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pgactive_upgrade import progress
from pgactive_upgrade.airflow.progress_api import GRANT_CACHE_SECONDS, RECORD_CACHE_SECONDS, RECORD_REFRESH_GRACE_SECONDS
from topology.airflow_local import AirflowApiError, LocalAirflow
from topology.ports import Ports

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
SOURCE = "orders-db"
PROGRESS = f"/pgactive-upgrade/progress/{SOURCE}"
PORT = Ports.from_base(int(os.environ.get("PGU_TEST_BASE", "26400"))).airflow_api + 9
MARGIN_SECONDS = 0.5  # the api-server and this client share a loaded machine
STALE_AT_MOST = RECORD_CACHE_SECONDS + RECORD_REFRESH_GRACE_SECONDS + MARGIN_SECONDS


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("progress_airflow")
    instance = LocalAirflow(
        home=base / "home", dags_folder=REPO / "dags", plugins_folder=REPO / "plugins",
        port=PORT,
        # outsider: a user the auth manager grants nothing (no role)
        extra_env={"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,outsider:"},
        python_paths=[REPO / "include", REPO],
    )
    instance.start(timeout=240)
    yield instance
    instance.stop()


def put_variable(airflow: LocalAirflow, key: str, value: dict) -> None:
    body = {"key": key, "value": json.dumps(value)}
    try:
        airflow.api("PATCH", f"variables/{key}", body)
    except AirflowApiError as error:
        assert error.status == 404, error
        airflow.api("POST", "variables", body)


def record(run_id: str, step: str) -> dict:
    return progress.progress_record(dag_id="pgactive_rolling_upgrade", run_id=run_id,
                                    conf={"source_instance": SOURCE}, step=step, state="running")


def status_of(airflow: LocalAirflow, path: str, token: str | None) -> int:
    try:
        airflow.get(path, token)
    except AirflowApiError as error:
        return error.status
    return 200


@pytest.fixture(scope="module")
def recorded(airflow):
    put_variable(airflow, progress.record_key(SOURCE), record("manual__first", "preflight"))
    return airflow


def test_every_request_is_authorized_whoever_asked_just_before(recorded):
    airflow = recorded
    viewer, outsider = airflow.token_for("viewer"), airflow.token_for("outsider")
    for _ in range(3):  # a grant remembered for the viewer is not one for anybody else
        assert airflow.get(PROGRESS, viewer)["run_id"] == "manual__first"
        assert status_of(airflow, PROGRESS, outsider) == 403
        assert status_of(airflow, PROGRESS, None) == 401
        assert status_of(airflow, PROGRESS, viewer[:-4] + "AAAA") == 403, "a token whose signature does not match"
    assert status_of(airflow, "/pgactive-upgrade/ui", outsider) == 403
    assert status_of(airflow, "/pgactive-upgrade/progress/unknown-db", viewer) == 404

    with ThreadPoolExecutor(20) as pool:  # concurrent askers, allowed and not, each answered as themselves
        answers = list(pool.map(lambda token: status_of(airflow, PROGRESS, token), [viewer, outsider] * 20))
    assert answers == [200, 403] * 20


@pytest.mark.parametrize("bad", ["orders--db", "1orders", "orders_db", "o" * 64, "orders-db-"])
def test_a_source_that_is_not_an_rds_identifier_is_refused_naming_it(recorded, bad):
    with pytest.raises(AirflowApiError) as error:
        recorded.get(f"/pgactive-upgrade/progress/{bad}", recorded.token_for("viewer"))
    assert error.value.status == 422 and "source_instance" in error.value.body


def logout(airflow: LocalAirflow, token: str) -> None:
    """Airflow's logout: revokes the token (its redirect to the login page is not followed)."""
    connection = http.client.HTTPConnection("127.0.0.1", airflow.port, timeout=30)
    connection.request("GET", "/api/v2/auth/logout", headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status in (302, 307), response.status


def test_a_revoked_token_is_refused_within_the_grant_time(recorded):
    airflow = recorded
    token = airflow.token_for("viewer")
    assert airflow.get(PROGRESS, token)["run_id"] == "manual__first"  # granted and remembered
    logout(airflow, token)
    revoked_at = time.monotonic()
    while (status := status_of(airflow, PROGRESS, token)) == 200:
        assert time.monotonic() - revoked_at < GRANT_CACHE_SECONDS + MARGIN_SECONDS, "still answered"
        time.sleep(0.05)
    assert status == 403
    time.sleep(GRANT_CACHE_SECONDS + 0.2)
    assert [status_of(airflow, PROGRESS, token) for _ in range(5)] == [403] * 5
    assert airflow.get(PROGRESS, airflow.token_for("viewer"))["run_id"] == "manual__first", "a new login is answered"


def test_a_new_record_is_answered_within_about_a_second(recorded):
    """Asked every 50 ms after each write: each new step, and the halt flag, is answered within STALE_AT_MOST."""
    airflow = recorded
    token = airflow.token_for("viewer")
    for step, run_id in (("build_group", "manual__first"), ("cutover", "manual__second")):
        assert airflow.get(PROGRESS, token)["step"] != step  # the previous answer is the one shared now
        put_variable(airflow, progress.record_key(SOURCE), record(run_id, step))
        written_at = time.monotonic()
        while (answer := airflow.get(PROGRESS, token))["step"] != step:
            assert time.monotonic() - written_at < STALE_AT_MOST, answer
            time.sleep(0.05)
        assert answer["run_id"] == run_id
    put_variable(airflow, progress.halt_key(SOURCE), {"run_id": "manual__second", "reason": "test"})
    written_at = time.monotonic()
    while not airflow.get(PROGRESS, token)["halted"]:
        assert time.monotonic() - written_at < STALE_AT_MOST, "the halt flag is not answered"
        time.sleep(0.05)
