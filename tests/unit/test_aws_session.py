"""AWS sessions through the shared-data factory read no botocore data file in a task process once the preload has
parsed them (README: a fleet of upgrades). Observed with an audit hook on `open`, in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from topology.airflow_local import FLEET_SETTINGS

REPO = Path(__file__).resolve().parents[2]
FACTORY = FLEET_SETTINGS["AIRFLOW__AWS__SESSION_FACTORY"]
CONNECTION = json.dumps({"conn_type": "aws", "login": "placeholder-key", "password": "placeholder-secret",
                         "extra": {"region_name": "us-east-1", "endpoint_url": "http://127.0.0.1:9"}})

# As a task process: the preload ran before (in the forkserver), then the step makes its RDS and Route 53 clients.
STEP = """
import json, sys
import pgactive_upgrade.airflow.preload
from airflow.providers.amazon.aws.hooks import base_aws
from airflow.providers.amazon.aws.hooks.rds import RdsHook
from pgactive_upgrade.airflow import aws_session
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and "botocore" in str(args[0])
                 else None)
rds = RdsHook(aws_conn_id="fleet_aws").conn
route53 = base_aws.AwsBaseHook(aws_conn_id="fleet_aws", client_type="route53").get_conn()
search_paths = [len(RdsHook(aws_conn_id="fleet_aws").get_session()._session.get_component("data_loader").search_paths)
                for _ in range(5)]
print(json.dumps({
    "search_paths": search_paths,
    "factory": base_aws.SessionFactory.__name__,
    "shared_loader": RdsHook(aws_conn_id="fleet_aws").get_session()._session.get_component("data_loader")
                     is aws_session.DATA_LOADER,
    "endpoint": rds.meta.endpoint_url, "route53_region": route53.meta.region_name,
    "data_files_read": sorted({path for path in opened if path.endswith((".json", ".json.gz"))}),
}))
"""


def step_in_fresh_interpreter(factory: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__AWS__SESSION_FACTORY"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "include"), str(REPO)]), AIRFLOW_CONN_FLEET_AWS=CONNECTION)
    if factory:
        env["AIRFLOW__AWS__SESSION_FACTORY"] = factory
    out = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("factory", [FACTORY], ids=["shared-data factory"])
def test_clients_of_a_task_process_read_no_botocore_data_file_after_the_preload(factory):
    step = step_in_fresh_interpreter(factory)
    assert step["factory"] == "SharedDataSessionFactory"
    assert step["shared_loader"] is True
    assert step["endpoint"] == "http://127.0.0.1:9", "the connection's endpoint_url still applies"
    assert step["route53_region"] == "us-east-1"
    assert step["data_files_read"] == []
    assert len(set(step["search_paths"])) == 1, f"each session grew the shared loader's search path: {step}"


def test_without_the_factory_every_session_parses_the_data_files_again():
    """The control: the same step with the provider's default factory reads them (so the test above can fail)."""
    step = step_in_fresh_interpreter(None)
    assert step["factory"] == "BaseSessionFactory"
    assert step["shared_loader"] is False
    assert any(path.endswith(("endpoints.json", "endpoints.json.gz")) for path in step["data_files_read"])
    assert any("/rds/" in path for path in step["data_files_read"])
