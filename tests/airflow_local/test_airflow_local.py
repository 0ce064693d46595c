import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from topology.airflow_local import AirflowApiError, LocalAirflow

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.airflow


def test_start_when_already_running_returns_fast_with_same_processes(local_airflow):
    before = local_airflow.status()["components"]
    started = time.monotonic()
    local_airflow.start()
    elapsed = time.monotonic() - started
    print(f"\nLocalAirflow start when already running: {elapsed:.3f}s")
    assert local_airflow.status()["components"] == before
    assert all(component["alive"] for component in before.values())
    assert elapsed < 5


def test_health_reports_every_component_healthy(local_airflow):
    health = local_airflow.api("GET", "monitor/health")
    assert {key: health[key]["status"] for key in ("metadatabase", "scheduler", "triggerer", "dag_processor")} == {
        "metadatabase": "healthy", "scheduler": "healthy", "triggerer": "healthy", "dag_processor": "healthy",
    }


def test_api_listens_on_loopback_only(local_airflow):
    assert local_airflow.url == f"http://127.0.0.1:{local_airflow.port}"
    with pytest.raises(OSError):
        socket.create_connection((_non_loopback_address(), local_airflow.port), timeout=2).close()


def test_api_error_carries_status_and_body(local_airflow):
    with pytest.raises(AirflowApiError) as error:
        local_airflow.api("GET", "dags/no_such_dag")
    assert error.value.status == 404
    assert "no_such_dag" in error.value.body


def test_a_refusal_through_the_typed_client_is_an_api_error_too(local_airflow):
    with pytest.raises(AirflowApiError) as error:
        local_airflow.trigger("no_such_dag", {})
    assert error.value.status == 404
    assert "no_such_dag" in error.value.body


def test_token_is_refused_with_a_wrong_password(local_airflow):
    with pytest.raises(AirflowApiError) as error:
        local_airflow._request("POST", "/auth/token", {"username": "admin", "password": "wrong"}, token=None)
    assert error.value.status == 401


def test_admin_password_never_reaches_component_logs(local_airflow):
    password = local_airflow.password
    for log in local_airflow.run_dir.glob("*.log"):
        assert password not in log.read_text(errors="replace"), log


def test_deferrable_task_run_succeeds_and_passes_through_deferred(local_airflow):
    local_airflow.wait_for_dag("deferral_probe", timeout=120)
    polled_states: list[dict] = []

    started = time.monotonic()
    run_id = local_airflow.trigger("deferral_probe", {"probe": 1}, run_id=f"probe_{uuid.uuid4().hex[:8]}")
    state = local_airflow.wait_for_run(
        "deferral_probe", run_id, timeout=90,
        on_poll=lambda tis: polled_states.append({ti["task_id"]: ti["state"] for ti in tis}),
    )
    print(f"\ntrigger -> success (one task + 3 s deferral): {time.monotonic() - started:.1f}s")

    assert state == "success"
    run = local_airflow.api("GET", f"dags/deferral_probe/dagRuns/{run_id}")
    assert run["conf"] == {"probe": 1}
    finals = {ti["task_id"]: ti["state"] for ti in local_airflow.task_instances("deferral_probe", run_id)}
    assert finals == {"hello": "success", "wait": "success"}
    assert "deferred" in {states.get("wait") for states in polled_states}
    assert local_airflow.saw_deferred("deferral_probe", run_id, "wait")
    assert not local_airflow.saw_deferred("deferral_probe", run_id, "hello")


def test_trigger_to_first_task_success_latency(local_airflow):
    local_airflow.wait_for_dag("deferral_probe", timeout=120)
    started = time.monotonic()
    run_id = local_airflow.trigger("deferral_probe", {})
    while _state_of(local_airflow, run_id, "hello") != "success":
        assert time.monotonic() - started < 60
        time.sleep(0.1)
    print(f"\ntrigger -> first task success: {time.monotonic() - started:.2f}s")
    assert local_airflow.wait_for_run("deferral_probe", run_id, timeout=60) == "success"


def test_another_home_on_the_same_port_does_not_take_this_instance_for_its_own(local_airflow, tmp_path):
    stranger = LocalAirflow(
        home=tmp_path / "other_home", dags_folder=local_airflow.dags_folder,
        plugins_folder=local_airflow.plugins_folder, port=local_airflow.port,
    )
    with pytest.raises(RuntimeError, match=f"port {local_airflow.port} is in use"):
        stranger.start(timeout=30)
    assert local_airflow.status()["components"]["api-server"]["alive"]


def test_cli_status_reports_the_running_instance(local_airflow):
    result = subprocess.run(
        [sys.executable, "-m", "topology.airflow_local", "status", "--home", str(local_airflow.home),
         "--port", str(local_airflow.port)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert all(component["alive"] for component in status["components"].values())
    assert status["health"]["scheduler"]["status"] == "healthy"


def test_stop_with_a_running_task_leaves_no_process_behind(local_airflow):
    local_airflow.wait_for_dag("long_task", timeout=120)
    run_id = local_airflow.trigger("long_task", {})
    deadline = time.monotonic() + 60
    while _state_of(local_airflow, run_id, "sleep", dag_id="long_task") != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    processes = local_airflow.processes()
    assert len(processes) > 4  # the four components plus executor workers and the task's processes

    started = time.monotonic()
    local_airflow.stop()
    print(f"\nstop with a running task: {time.monotonic() - started:.1f}s")

    assert [pid for pid in processes if _alive(pid)] == []
    assert local_airflow.processes() == []
    assert not any(component["alive"] for component in local_airflow.status()["components"].values())
    local_airflow.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", local_airflow.port), timeout=2).close()


def _state_of(airflow, run_id, task_id, dag_id="deferral_probe"):
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(dag_id, run_id)}
    return states.get(task_id)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _non_loopback_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface address
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this machine")
    return address
