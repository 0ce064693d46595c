"""What a run may touch, set by the deployment (admins), not by the conf: the conf only chooses among it.

The deployment configuration is one JSON document (the Airflow Variable `pgactive_upgrade_deployment`, best kept
in the environment or a secrets backend so the UI cannot edit it). See README.md, "Deployment security".
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from pgactive_upgrade.config import UpgradeRequest
from pgactive_upgrade.db import Tls, is_loopback

VARIABLE = "pgactive_upgrade_deployment"
WHERE_DOCUMENTED = 'README.md, section "Deployment security"'
CONNECTION_FIELDS = ("db_conn_id", "replication_conn_id", "probe_conn_id", "aws_conn_id")
DEFAULT_RDS_CA_BUNDLE = "/opt/airflow/certs/rds-global-bundle.pem"

_PATTERNS = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 300}}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["connections", "sources"],
    "properties": {
        "connections": {
            "type": "object",
            "additionalProperties": False,
            "required": list(CONNECTION_FIELDS),
            "properties": {name: {"type": "array", "items": {"type": "string"}} for name in CONNECTION_FIELDS},
        },
        "endpoint_override_targets": _PATTERNS,
        "sources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "identifiers": _PATTERNS,
                "tags": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "root_cert": {"type": "string", "minLength": 1},
                "require_auth": {"type": "string", "enum": ["scram-sha-256", "md5", "password"]},
                "peer_sslmode": {"type": "string", "enum": ["require", "verify-ca", "verify-full"]},
                "local_only_no_tls": {"type": "boolean"},
                "local_hosts": {"type": "array", "items": {"type": "string", "minLength": 1}},
            },
        },
    },
}


class DeploymentError(ValueError):
    """The deployment configuration is missing or invalid, or a request asks for what it does not allow."""


@dataclass(frozen=True)
class Deployment:
    connections: dict[str, tuple[str, ...]]
    endpoint_override_targets: tuple[str, ...] = ()
    source_identifiers: tuple[str, ...] = ()
    source_tags: dict[str, str] = field(default_factory=dict)
    root_cert: str = DEFAULT_RDS_CA_BUNDLE
    require_auth: str = "scram-sha-256"
    peer_sslmode: str = "require"
    local_only_no_tls: bool = False
    local_hosts: tuple[str, ...] = ()  # host names that count as local for the opt-out (docker compose services)

    # --- what the conf may choose ----------------------------------------------------------------
    def request_problems(self, request: UpgradeRequest) -> list[str]:
        """Each field of the request that reaches outside what the deployment allows, by name."""
        problems = []
        for name in CONNECTION_FIELDS:
            chosen = getattr(request, name)
            if chosen not in self.connections[name]:
                problems.append(f"{name}: {chosen!r} is not allowed by the deployment "
                                f"(allowed: {', '.join(self.connections[name]) or 'none'})")
        for identifier, address in request.endpoint_overrides.items():
            if not any(_address_matches(address, pattern) for pattern in self.endpoint_override_targets):
                problems.append(f"endpoint_overrides.{identifier}: {address!r} is not an allowed override target "
                                f"(allowed: {', '.join(self.endpoint_override_targets) or 'none'})")
        if self.local_only_no_tls:
            problems += self._local_only_problems(request)
        return problems

    def source_problems(self, identifier: str, tags: dict[str, str]) -> list[str]:
        """The source is allowed by its identifier, or by carrying every listed tag (as RDS reports them)."""
        if any(fnmatch.fnmatchcase(identifier.lower(), p.lower()) for p in self.source_identifiers):
            return []
        if self.source_tags and all(tags.get(k) == v for k, v in self.source_tags.items()):
            return []
        wanted = [f"identifiers {list(self.source_identifiers)}"] + (
            [f"tags {self.source_tags}"] if self.source_tags else [])
        return [f"source_instance: {identifier!r} is not an allowed source (allowed: {' or '.join(wanted)})"]

    def _local_only_problems(self, request: UpgradeRequest) -> list[str]:
        """The TLS opt-out holds for servers on this machine only: every instance must be reached on loopback."""
        problems = []
        for identifier, address in request.endpoint_overrides.items():
            if not self._local(address.rsplit(":", 1)[0]):
                problems.append(f"endpoint_overrides.{identifier}: {address!r} is not a loopback address (nor in "
                                "tls.local_hosts), and the deployment's tls.local_only_no_tls applies to local servers "
                                "only")
        return problems

    def _local(self, host: str) -> bool:
        return is_loopback(host) or host in self.local_hosts

    # --- how to connect --------------------------------------------------------------------------
    def tls(self, iam: bool) -> Tls:
        """IAM tokens go out as a clear-text password (RDS asks for one): only over verify-full TLS."""
        if self.local_only_no_tls:
            if iam:
                raise DeploymentError("IAM database authentication needs TLS: tls.local_only_no_tls cannot be used "
                                      f"with a connection whose extra sets iam ({WHERE_DOCUMENTED})")
            return Tls(sslmode="prefer", sslrootcert="", require_auth="scram-sha-256", peer_sslmode="prefer",
                       loopback_only=True, local_hosts=self.local_hosts)
        return Tls(sslmode="verify-full", sslrootcert=self.root_cert,
                   require_auth="password" if iam else self.require_auth, peer_sslmode=self.peer_sslmode)


def parse(raw: str | None) -> Deployment:
    if not raw:
        raise DeploymentError(
            f"no deployment configuration: an admin sets the Airflow Variable {VARIABLE} (JSON: the allowed "
            f"connection ids, endpoint override targets and source instances, and TLS), see {WHERE_DOCUMENTED}")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DeploymentError(f"Variable {VARIABLE}: not JSON ({error.msg} at position {error.pos})") from None
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        raise DeploymentError(f"Variable {VARIABLE}: " + "; ".join(
            f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors))
    sources, tls = document["sources"], document.get("tls", {})
    return Deployment(
        connections={name: tuple(document["connections"][name]) for name in CONNECTION_FIELDS},
        endpoint_override_targets=tuple(document.get("endpoint_override_targets", ())),
        source_identifiers=tuple(sources.get("identifiers", ())),
        source_tags=dict(sources.get("tags", {})),
        root_cert=tls.get("root_cert", DEFAULT_RDS_CA_BUNDLE),
        require_auth=tls.get("require_auth", "scram-sha-256"),
        peer_sslmode=tls.get("peer_sslmode", "require"),
        local_only_no_tls=bool(tls.get("local_only_no_tls", False)),
        local_hosts=tuple(tls.get("local_hosts", ())),
    )


def _address_matches(address: str, pattern: str) -> bool:
    """pattern: "host:port", each part a shell-style pattern ("10.0.1.*:5432", "*.internal.example.com:*")."""
    host, port = address.rsplit(":", 1)
    if ":" not in pattern:
        return False
    host_pattern, port_pattern = pattern.rsplit(":", 1)
    return fnmatch.fnmatchcase(host.lower(), host_pattern.lower()) and fnmatch.fnmatchcase(port, port_pattern)
