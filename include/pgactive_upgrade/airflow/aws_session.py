"""AWS sessions that share one reader of botocore's data files, for a deployment's `[aws] session_factory`:

    AIRFLOW__AWS__SESSION_FACTORY=pgactive_upgrade.airflow.aws_session.SharedDataSessionFactory

Each new boto3 session parses botocore's endpoint and service JSON files again: 0.06 to 0.2 s of CPU, and every step
that calls RDS or Route 53 makes one, about a quarter of a short step's CPU (bench/fleet.py). The Amazon provider
already gives all its async sessions one loader; this factory does the same for the sync sessions it makes from a
connection's keys or the default credential chain. With the forkserver preload (README: "A fleet of upgrades"), the
files are parsed once, in the forkserver, and every task process inherits them parsed.

Sessions made from a connection with `role_arn` (assume role) or from no connection at all are made as before, each
with a loader of its own. The shared loader's search path is the default profile's (`AWS_DATA_PATH` included), as the
process starts: a `data_path` set in a connection's own profile is not read.

Airflow imports this module wherever it imports the Amazon provider's hooks: `include/` must be importable there.
The provider imports it from `base_aws` itself, so import `base_aws` first (importing this module first, with the
setting on, fails: `base_aws` would ask for a class this module has not defined yet).
"""

from __future__ import annotations

import os
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from airflow.providers.amazon.aws.hooks.base_aws import BaseSessionFactory

SERVICES_USED = ("rds", "route53", "sts")


class _SearchPaths(list):
    """boto3 appends its own data folder to the loader of every session it makes: shared by all sessions, the list
    would grow by one path per session for the life of the process, and every lookup walks it."""

    def append(self, path: str) -> None:
        if path not in self:
            super().append(path)


def _loader() -> botocore.loaders.Loader:
    """The loader a default botocore session makes (botocore.loaders.create_loader), on a search path list that
    keeps each folder once. It only reads files."""
    data_path = botocore.session.Session().get_config_variable("data_path")
    folders = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else []
    return botocore.loaders.Loader(extra_search_paths=_SearchPaths(folders))


DATA_LOADER = _loader()


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
