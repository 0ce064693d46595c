"""Under a real scheduler and triggerer, with RDS as slow as the real one (topology/slow_rds.py): while an instance
is created or rebooted the step waits deferred, in the triggerer, holding no worker slot; then the run goes on."""

from __future__ import annotations

import json

import pytest

from tests.airflow_real.runs import forget_earlier_upgrades, states_of
from topology import aws
from topology.demo import demo_conf
from topology.slow_rds import SlowRds

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

UPGRADE = "pgactive_rolling_upgrade"
SLOW_CONN = "pgu_aws_slow"


@pytest.fixture
def slow_rds(airflow, fresh_databases):
    airflow.wait_for_dag(UPGRADE)
    forget_earlier_upgrades(airflow)
    with SlowRds(fresh_databases.moto_url, create_seconds=20, reboot_seconds=6) as slow:
        extra = json.dumps({"endpoint_url": slow.url, "region_name": aws.REGION})
        airflow.api("POST", "connections", {"connection_id": SLOW_CONN, "conn_type": "aws", "login": "testing",
                                            "password": "testing", "extra": extra})
        try:
            yield airflow, fresh_databases, slow
        finally:
            airflow.api("DELETE", f"connections/{SLOW_CONN}")


def test_instance_creation_and_reboots_are_waited_for_deferred(slow_rds):
    airflow, topo, slow = slow_rds
    conf = {**demo_conf(topo), "aws_conn_id": SLOW_CONN, "shift_percentages": [], "decommission": "keep",
            "rds_poll_seconds": 2}
    run_id = airflow.trigger(UPGRADE, conf)
    seen: dict[str, set] = {}

    def note(tis: list[dict]) -> None:
        for ti in tis:
            seen.setdefault(ti["task_id"], set()).add(ti["state"])

    state = airflow.wait_for_run(UPGRADE, run_id, timeout=300, on_poll=note, poll_interval=0.3)

    assert state == "success", states_of(airflow, UPGRADE, run_id)
    assert "deferred" in seen["configure_parameters"], seen["configure_parameters"]
    tries = {ti["task_id"]: ti["try_number"] for ti in airflow.task_instances(UPGRADE, run_id)}
    assert tries["configure_parameters"] == 1, "the waits succeed on their first try (a retry hides a broken trigger)"
    describes = [at for at, action in slow.calls if action == "DescribeDBInstances"]
    created = next(at for at, action in slow.calls if action == "CreateDBInstance")
    assert [at for at in describes if created < at < created + 18], "the triggerer polled while it was creating"
    reboot = next(at for at, action in slow.calls if action == "RebootDBInstance")
    assert created < reboot < created + 20, "the source reboots while the target is still being created"
