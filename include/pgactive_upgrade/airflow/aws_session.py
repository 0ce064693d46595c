"""AWS sessions that share one reader of botocore's data files, for a deployment's `[aws] session_factory`:

    AIRFLOW__AWS__SESSION_FACTORY=pgactive_upgrade.airflow.aws_session.SharedDataSessionFactory

Each new boto3 session parses botocore's endpoint and service JSON files again: 0.06 to 0.2 s of CPU, and every step
that calls RDS or Route 53 makes one, about a quarter of a short step's CPU (bench/fleet.py). The Amazon provider
already gives all its async sessions one loader; this factory does the same for its sync sessions. With the forkserver
preload (README: "A fleet of upgrades"), the files are parsed once, in the forkserver, and every task process
inherits them parsed.

Airflow imports this module wherever it imports the Amazon provider's hooks: `include/` must be importable there.
"""

from __future__ import annotations

from typing import Any

import boto3
import botocore.session
from airflow.providers.amazon.aws.hooks.base_aws import BaseSessionFactory

# The loader a default botocore session makes (the same search path, AWS_DATA_PATH included); it only reads files.
DATA_LOADER = botocore.session.Session().get_component("data_loader")
SERVICES_USED = ("rds", "route53", "sts")


def shared_data_session() -> botocore.session.Session:
    session = botocore.session.Session()
    session.register_component("data_loader", DATA_LOADER)
    return session


class SharedDataSessionFactory(BaseSessionFactory):
    """The provider's session factory, with its sessions reading botocore's data through `DATA_LOADER`. Sessions
    that assume a role get their first credentials from such a session too."""

    def _create_basic_session(self, session_kwargs: dict[str, Any]) -> boto3.session.Session:
        return boto3.session.Session(botocore_session=shared_data_session(), **session_kwargs)


def parse_service_data() -> None:
    """Parses the endpoints and the models of the services the upgrade uses now, for processes forked later. Makes
    clients with placeholder keys so that no credential lookup happens; nothing is sent."""
    session = shared_data_session()
    for service in SERVICES_USED:
        session.create_client(service, region_name="us-east-1", aws_access_key_id="preload",
                              aws_secret_access_key="preload")
