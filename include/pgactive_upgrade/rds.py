"""Provisioning through the RDS API: parameter groups, target instance, reboots, decommission.

Plain Python on a boto3 RDS client (the Airflow layer passes ``RdsHook(aws_conn_id=...).conn``).
Never call ``describe_db_engine_versions``: moto cannot serve it, and our validation must not rely on the API.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Callable

from botocore.exceptions import ClientError

from pgactive_upgrade.identifiers import identifier_from, validate_identifier

log = logging.getLogger(__name__)

SOURCE_TAG = "pgactive-upgrade:source"
SNAPSHOT_MAX = 255
PARAMETER_GROUP_MAX = 255
MAX_PARAMETERS_PER_MODIFY = 20

# States an instance does not leave by itself: waiting longer cannot help.
_DEAD_END_STATES = {
    "failed", "deleting", "deleted", "stopped", "stopping", "storage-full", "restore-error",
    "inaccessible-encryption-credentials", "inaccessible-encryption-credentials-recoverable",
}
# pgactive needs rds.enable_pgactive (turns on logical replication and commit timestamps, per AWS docs);
# the other values are set explicitly so the group documents what the upgrade relies on.
_REPLICATION_CAPACITY = {"max_replication_slots": "20", "max_wal_senders": "20", "max_worker_processes": "16"}
_DRIVER_PARAMETERS = {
    "pgactive": {"rds.enable_pgactive": "1", "rds.logical_replication": "1", "track_commit_timestamp": "1"},
    "native": {"rds.logical_replication": "1"},
}
# First RDS minor with pgactive per major (15.4 needs the R2 build, which the version string cannot show).
_PGACTIVE_MIN_MINOR = {11: 22, 12: 17, 13: 13, 14: 10, 15: 4, 16: 1, 17: 0}


class RdsError(Exception):
    """An RDS resource is missing or in a state the upgrade cannot proceed from."""


@dataclass(frozen=True)
class InstanceInfo:
    identifier: str
    arn: str
    engine: str
    engine_version: str
    major: int
    instance_class: str
    allocated_storage: int
    storage_type: str
    iops: int | None
    db_subnet_group: str | None
    security_group_ids: tuple[str, ...]
    parameter_group: str | None
    parameter_apply_status: str | None
    status: str
    endpoint_host: str | None
    endpoint_port: int | None
    db_name: str | None
    master_username: str
    multi_az: bool
    publicly_accessible: bool
    kms_key_id: str | None
    storage_encrypted: bool
    deletion_protection: bool
    backup_retention_period: int
    tags: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceInfo:
        """The inverse of as_dict, also after a JSON round trip (tuples come back as lists)."""
        return cls(**{**data, "security_group_ids": tuple(data["security_group_ids"]),
                      "tags": tuple((key, value) for key, value in data["tags"])})


# ---------------------------------------------------------------- names and versions


def major_of(engine_version: str) -> int:
    if not re.fullmatch(r"\d+(\.\d+){0,2}", engine_version or ""):
        raise RdsError(f"invalid PostgreSQL engine version {engine_version!r}: expected e.g. '17.2' or '17'")
    return int(engine_version.split(".")[0])


def parameter_group_family(engine_version: str) -> str:
    """'17.2' -> 'postgres17'; 9.x majors had two-part families ('9.6.20' -> 'postgres9.6')."""
    major = major_of(engine_version)
    if major < 10:
        return "postgres" + ".".join(engine_version.split(".")[:2])
    return f"postgres{major}"


def supports_pgactive(engine_version: str) -> bool:
    major = major_of(engine_version)
    parts = engine_version.split(".")
    minor = int(parts[1]) if len(parts) > 1 else None
    if major not in _PGACTIVE_MIN_MINOR:
        return major > max(_PGACTIVE_MIN_MINOR)
    # A bare major ('17') lets RDS pick its default minor, which is recent enough for 16+ only.
    return minor >= _PGACTIVE_MIN_MINOR[major] if minor is not None else major >= 16


def check_target_version(source: InstanceInfo, engine_version: str) -> int:
    target_major = major_of(engine_version)
    if target_major <= source.major:
        raise RdsError(
            f"target engine version {engine_version} (major {target_major}) must be a higher major than "
            f"source {source.identifier} ({source.engine_version})"
        )
    return target_major


def pgactive_parameters(driver: str) -> dict[str, str]:
    if driver not in _DRIVER_PARAMETERS:
        raise RdsError(f"unknown replication driver {driver!r}: expected one of {sorted(_DRIVER_PARAMETERS)}")
    return {**_DRIVER_PARAMETERS[driver], **_REPLICATION_CAPACITY}


# ---------------------------------------------------------------- describe


def _error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def _to_info(raw: dict[str, Any]) -> InstanceInfo:
    groups = raw.get("DBParameterGroups") or [{}]
    endpoint = raw.get("Endpoint") or {}
    return InstanceInfo(
        identifier=raw["DBInstanceIdentifier"],
        arn=raw.get("DBInstanceArn", ""),
        engine=raw.get("Engine", ""),
        engine_version=raw.get("EngineVersion", ""),
        major=int(re.match(r"\d*", raw.get("EngineVersion", "")).group() or 0),  # type: ignore[union-attr]  # \d* always matches
        instance_class=raw.get("DBInstanceClass", ""),
        allocated_storage=int(raw.get("AllocatedStorage", 0)),
        storage_type=raw.get("StorageType", ""),
        iops=raw.get("Iops"),
        db_subnet_group=(raw.get("DBSubnetGroup") or {}).get("DBSubnetGroupName"),
        security_group_ids=tuple(sg["VpcSecurityGroupId"] for sg in raw.get("VpcSecurityGroups", [])),
        parameter_group=groups[0].get("DBParameterGroupName"),
        parameter_apply_status=groups[0].get("ParameterApplyStatus"),
        status=raw.get("DBInstanceStatus", ""),
        endpoint_host=endpoint.get("Address"),
        endpoint_port=endpoint.get("Port"),
        db_name=raw.get("DBName"),
        master_username=raw.get("MasterUsername", ""),
        multi_az=bool(raw.get("MultiAZ")),
        publicly_accessible=bool(raw.get("PubliclyAccessible")),
        kms_key_id=raw.get("KmsKeyId"),
        storage_encrypted=bool(raw.get("StorageEncrypted")),
        deletion_protection=bool(raw.get("DeletionProtection")),
        backup_retention_period=int(raw.get("BackupRetentionPeriod", 0)),
        tags=tuple((t["Key"], t["Value"]) for t in raw.get("TagList", [])),
    )


def describe_instance(rds, identifier_or_arn: str) -> InstanceInfo | None:
    try:
        found = rds.describe_db_instances(DBInstanceIdentifier=identifier_or_arn)["DBInstances"]
    except ClientError as error:
        if _error_code(error) == "DBInstanceNotFound":
            return None
        raise
    return _to_info(found[0]) if found else None


def resolve_source(rds, identifier_or_arn: str) -> InstanceInfo:
    identifier = identifier_from(identifier_or_arn)
    info = describe_instance(rds, identifier)
    if info is None:
        raise RdsError(f"source DB instance {identifier_or_arn} not found in region {rds.meta.region_name}")
    if identifier_or_arn.startswith("arn:") and info.arn and info.arn != identifier_or_arn:
        raise RdsError(f"source ARN {identifier_or_arn} does not match the instance this client sees ({info.arn}): "
                       "wrong account or region?")
    if info.engine != "postgres":
        raise RdsError(f"source {identifier} runs engine {info.engine!r}; "
                       "only RDS for PostgreSQL ('postgres') is supported")
    return info


# ---------------------------------------------------------------- parameter groups


def _describe_parameter_group(rds, name: str) -> dict | None:
    try:
        groups = rds.describe_db_parameter_groups(DBParameterGroupName=name)["DBParameterGroups"]
    except ClientError as error:
        if _error_code(error) == "DBParameterGroupNotFound":
            return None
        raise
    return groups[0] if groups else None  # moto answers an empty list instead of the fault


def _user_parameters(rds, name: str) -> dict[str, str]:
    pages = rds.get_paginator("describe_db_parameters").paginate(DBParameterGroupName=name, Source="user")
    return {p["ParameterName"]: p.get("ParameterValue") for page in pages for p in page["Parameters"]}


def custom_parameters(rds, name: str | None) -> dict[str, str]:
    """What a group sets itself: nothing for a default group or one that does not exist."""
    if name is None or _is_default_group(name) or _describe_parameter_group(rds, name) is None:
        return {}
    return _user_parameters(rds, name)


def planned_parameter_group(rds, name: str, parameters: dict[str, str]) -> dict:
    """What ensure_parameter_group would do, changing nothing: {exists, set: the parameters it would set}."""
    group = _describe_parameter_group(rds, name)
    current = {} if group is None else _user_parameters(rds, name)
    return {"exists": group is not None, "family": group["DBParameterGroupFamily"] if group else None,
            "set": {k: str(v) for k, v in parameters.items() if current.get(k) != str(v)}}


def ensure_parameter_group(rds, name: str, family: str, description: str, parameters: dict[str, str]) -> bool:
    """Create the group if missing and set ``parameters``; returns True when anything changed."""
    validate_identifier(name, kind="DB parameter group name", max_len=PARAMETER_GROUP_MAX)
    group = _describe_parameter_group(rds, name)
    created = group is None
    if group is None:
        rds.create_db_parameter_group(DBParameterGroupName=name, DBParameterGroupFamily=family, Description=description)
        log.info("created DB parameter group %s (family %s)", name, family)
    elif group["DBParameterGroupFamily"] != family:
        raise RdsError(f"DB parameter group {name} exists with family {group['DBParameterGroupFamily']}, "
                       f"expected {family}")
    current = {} if created else _user_parameters(rds, name)
    wanted = {k: str(v) for k, v in parameters.items() if current.get(k) != str(v)}
    items = [{"ParameterName": k, "ParameterValue": v, "ApplyMethod": "pending-reboot"} for k, v in wanted.items()]
    for start in range(0, len(items), MAX_PARAMETERS_PER_MODIFY):
        batch = items[start:start + MAX_PARAMETERS_PER_MODIFY]
        rds.modify_db_parameter_group(DBParameterGroupName=name, Parameters=batch)
    if wanted:
        log.info("set parameters on %s: %s", name, wanted)
    return created or bool(wanted)


# ---------------------------------------------------------------- target instance


def _reuse_mismatches(existing: InstanceInfo, *, source_id: str, target_major: int, instance_class: str,
                      subnet_group: str | None) -> list[str]:
    # The tag proves we created it for this source: never adopt an unrelated instance that happens to share the name.
    checks = [
        (f"tag {SOURCE_TAG}", dict(existing.tags).get(SOURCE_TAG), source_id),
        ("engine", existing.engine, "postgres"),
        ("engine major", existing.major, target_major),
        ("instance class", existing.instance_class, instance_class),
        ("DB subnet group", existing.db_subnet_group, subnet_group),
    ]
    return [f"{what} is {have!r}, expected {want!r}" for what, have, want in checks if have != want]


def ensure_target_instance(
    rds,
    *,
    source: InstanceInfo,
    target_id: str,
    engine_version: str,
    parameter_group: str,
    master_password: str,
    tags: dict[str, str],
    instance_class: str | None = None,
    db_subnet_group: str | None = None,
    security_group_ids: tuple[str, ...] | list[str] | None = None,
) -> InstanceInfo:
    """Create the target like the source (class, storage, network, encryption, ...) or reuse a matching one.

    Does not wait for it to become available: call wait_available afterwards.
    """
    validate_identifier(target_id)
    if target_id == source.identifier:
        raise RdsError(f"target identifier {target_id} is the source instance itself")
    target_major = check_target_version(source, engine_version)
    _check_group_family(rds, parameter_group, engine_version)
    instance_class = instance_class or source.instance_class
    subnet_group = db_subnet_group or source.db_subnet_group

    existing = describe_instance(rds, target_id)
    if existing is None:
        request = _create_request(source, target_id, engine_version, parameter_group, instance_class, subnet_group,
                                  security_group_ids, tags)
        try:
            rds.create_db_instance(**request, MasterUserPassword=master_password)
            log.info("creating target DB instance %s (%s, %s) from source %s",
                     target_id, engine_version, instance_class, source.identifier)
        except ClientError as error:
            if _error_code(error) != "DBInstanceAlreadyExists":  # a concurrent or retried create won the race
                raise RdsError(f"creating target {target_id} failed: {_error_code(error)}: "
                               f"{error.response.get('Error', {}).get('Message', '')}") from None
        existing = describe_instance(rds, target_id)
        if existing is None:
            raise RdsError(f"target {target_id} was created but describe_db_instances does not return it")
        return existing

    mismatches = _reuse_mismatches(existing, source_id=source.identifier, target_major=target_major,
                                   instance_class=instance_class, subnet_group=subnet_group)
    if mismatches:
        raise RdsError(f"DB instance {target_id} already exists but cannot be reused as the target: "
                       + "; ".join(mismatches))
    if existing.status in _DEAD_END_STATES:
        raise RdsError(f"existing target {target_id} is in state {existing.status!r}; cannot reuse it")
    log.info("reusing existing target DB instance %s (%s, status %s)",
             target_id, existing.engine_version, existing.status)
    return existing


def _check_group_family(rds, parameter_group: str, engine_version: str) -> None:
    group = _describe_parameter_group(rds, parameter_group)
    family = parameter_group_family(engine_version)
    if group is None:
        raise RdsError(f"DB parameter group {parameter_group} does not exist; create it (family {family}) first")
    if group["DBParameterGroupFamily"] != family:
        raise RdsError(f"DB parameter group {parameter_group} has family {group['DBParameterGroupFamily']}, "
                       f"but engine version {engine_version} needs {family}")


def _create_request(source: InstanceInfo, target_id: str, engine_version: str, parameter_group: str,
                    instance_class: str, subnet_group: str | None, security_group_ids, tags: dict[str, str]) -> dict:
    all_tags = {**tags, SOURCE_TAG: source.identifier}
    request: dict[str, Any] = {
        "DBInstanceIdentifier": target_id,
        "Engine": "postgres",
        "EngineVersion": engine_version,
        "DBInstanceClass": instance_class,
        "AllocatedStorage": source.allocated_storage,
        "StorageType": source.storage_type,
        "DBParameterGroupName": parameter_group,
        "VpcSecurityGroupIds": list(security_group_ids or source.security_group_ids),
        "MultiAZ": source.multi_az,
        "PubliclyAccessible": source.publicly_accessible,
        "StorageEncrypted": source.storage_encrypted,
        "MasterUsername": source.master_username,
        "BackupRetentionPeriod": source.backup_retention_period,
        "DeletionProtection": source.deletion_protection,
        "CopyTagsToSnapshot": True,
        "Tags": [{"Key": k, "Value": str(v)} for k, v in all_tags.items()],
    }
    optional = {
        "DBSubnetGroupName": subnet_group,
        "DBName": source.db_name,
        "KmsKeyId": source.kms_key_id if source.storage_encrypted else None,
        # io1/io2 require Iops; gp3 baseline IOPS depend on size, so only provisioned types carry it over.
        "Iops": source.iops if source.storage_type in ("io1", "io2") else None,
    }
    request.update({k: v for k, v in optional.items() if v is not None})
    return request


# ---------------------------------------------------------------- waiting, reboots, group attachment


@dataclass(frozen=True)
class Wait:
    """An instance is busy: the step comes back once it is `until` (AVAILABLE, IN_SYNC or DELETED). The steps
    never wait themselves: the Airflow layer defers to a trigger, and runs the step again afterwards."""
    identifier: str
    until: str
    why: str


AVAILABLE, IN_SYNC, DELETED = "available", "in_sync", "deleted"


def _unless_busy(call: Callable[[], Any], identifier: str, what: str) -> Wait | None:
    """Make the call; RDS refuses reboot/modify/delete while an instance is busy (InvalidDBInstanceState)."""
    try:
        call()
    except ClientError as error:
        if _error_code(error) == "InvalidDBInstanceState":
            return Wait(identifier, AVAILABLE, f"{what}: instance busy")
        raise RdsError(f"{what} failed: {_error_code(error)}: {error.response.get('Error', {}).get('Message', '')}") from None
    return None


def usable_instance(rds, identifier: str) -> InstanceInfo:
    """The instance as RDS describes it; RdsError when it does not exist or is in a state it does not leave."""
    info = describe_instance(rds, identifier)
    if info is None:
        raise RdsError(f"DB instance {identifier} does not exist")
    if info.status in _DEAD_END_STATES or info.status.startswith("incompatible-"):
        raise RdsError(f"DB instance {identifier} is in state {info.status!r}; expected 'available'")
    return info


def settle_parameter_group(rds, identifier: str, parameter_group: str, *, may_reboot: bool,
                           reboot: bool = False) -> tuple[Wait | None, bool]:
    """One step towards `identifier` running `parameter_group` in-sync, without waiting: (what to wait for, or None
    once it does; whether this call rebooted it). Attaches the group; reboots when RDS says a reboot is pending, or
    when `reboot` says this call's changes need one; never reboots twice in one call.
    may_reboot: False refuses a reboot (the source without allow_source_reboot)."""
    info = usable_instance(rds, identifier)
    if info.status == "rebooting":  # its parameters apply with the reboot: wait for in-sync, not only available
        return Wait(identifier, IN_SYNC, "rebooting"), False
    if info.status != "available":
        return Wait(identifier, AVAILABLE, f"status {info.status}"), False
    if info.parameter_group != parameter_group:
        _check_group_family(rds, parameter_group, info.engine_version)
        what = f"attaching parameter group {parameter_group} to {identifier}"
        if wait := _unless_busy(lambda: rds.modify_db_instance(
                DBInstanceIdentifier=identifier, DBParameterGroupName=parameter_group, ApplyImmediately=True),
                identifier, what):
            return wait, False
        log.info("%s (was %s): a reboot is needed", what, info.parameter_group)
        info, reboot = usable_instance(rds, identifier), True
        if info.status != "available":
            return Wait(identifier, AVAILABLE, f"{what}: status {info.status}"), False
    if reboot or info.parameter_apply_status == "pending-reboot":
        if not may_reboot:
            raise RdsError(f"{identifier} must be rebooted to apply parameter group {parameter_group} "
                           "(a brief outage); set allow_source_reboot to true, or reboot it yourself first")
        if wait := _unless_busy(lambda: rds.reboot_db_instance(DBInstanceIdentifier=identifier), identifier,
                                f"rebooting {identifier}"):
            return wait, False
        log.info("rebooting DB instance %s", identifier)
        info = usable_instance(rds, identifier)
        # Right after the call RDS may still report the old state for a moment: in-sync is the real completion.
        done = info.status == "available" and info.parameter_apply_status == "in-sync"
        return (None if done else Wait(identifier, IN_SYNC, "rebooting")), True
    if info.parameter_apply_status != "in-sync":
        return Wait(identifier, IN_SYNC, f"parameters {info.parameter_apply_status}"), False
    return None, False


# ---------------------------------------------------------------- source parameters


@dataclass(frozen=True)
class SourcePlan:
    parameter_group: str  # the group the source will use (its current one when it already has what the driver needs)
    copy_from: str | None  # the source's current group when the source must move to a custom copy, else None
    changes: dict[str, str]  # parameter -> value still to set on parameter_group (empty when nothing to set)
    needs_reboot: bool  # the source must reboot: a new group, static parameters to set, or pending-reboot
    already_enabled: bool  # the source already runs with everything the driver needs (in-sync): touch nothing


def plan_source_parameters(rds, source: InstanceInfo, driver: str, *, custom_group_name: str) -> SourcePlan:
    """Decide, without changing anything, what the source needs for ``driver`` and whether that means a reboot.

    Default groups cannot be modified and a group shared with other instances must not be: both are copied to
    ``custom_group_name``, keeping every setting. A custom group used by the source alone is modified in place.
    """
    wanted = pgactive_parameters(driver)
    current = describe_instance(rds, source.identifier)  # fresh: a cached InstanceInfo may predate an earlier run
    if current is None:
        raise RdsError(f"source DB instance {source.identifier} not found")
    group = current.parameter_group
    if group is None:
        raise RdsError(f"source DB instance {current.identifier} reports no DB parameter group")
    missing = _unmet(wanted, _group_values(rds, group))
    if not missing:
        return _plan_in_place(current, group, {})
    if not _is_default_group(group) and not _other_users(rds, group, current.identifier):
        return _plan_in_place(current, group, missing)
    if group == custom_group_name:
        raise RdsError(f"parameter group {group} of {current.identifier} is shared with other instances "
                       f"({', '.join(_other_users(rds, group, current.identifier))}); choose another name for "
                       "the source's own copy")
    return _plan_copy(rds, current, group, custom_group_name, wanted)


def _plan_in_place(source: InstanceInfo, group: str, changes: dict[str, str]) -> SourcePlan:
    pending = source.parameter_apply_status == "pending-reboot"
    in_sync = source.parameter_apply_status == "in-sync"
    return SourcePlan(parameter_group=group, copy_from=None, changes=changes,
                      needs_reboot=bool(changes) or pending, already_enabled=not changes and in_sync)


def _plan_copy(rds, source: InstanceInfo, group: str, custom_group_name: str, wanted: dict[str, str]) -> SourcePlan:
    validate_identifier(custom_group_name, kind="DB parameter group name", max_len=PARAMETER_GROUP_MAX)
    existing = _describe_parameter_group(rds, custom_group_name)
    if existing is not None:  # left by an earlier, interrupted run (or a name clash, refused here)
        _check_reusable_copy(rds, existing, source)
        values = _group_values(rds, custom_group_name)
    else:
        values = _group_values(rds, group)
    return SourcePlan(parameter_group=custom_group_name, copy_from=group, changes=_unmet(wanted, values),
                      needs_reboot=True, already_enabled=False)


def _check_reusable_copy(rds, group: dict, source: InstanceInfo) -> None:
    name, family = group["DBParameterGroupName"], parameter_group_family(source.engine_version)
    if group["DBParameterGroupFamily"] != family:
        raise RdsError(f"DB parameter group {name} exists with family {group['DBParameterGroupFamily']}; "
                       f"source {source.identifier} needs {family}: choose another name for the source's copy")
    users = _other_users(rds, name, source.identifier)
    if users:
        raise RdsError(f"DB parameter group {name} already exists and is used by {', '.join(users)}; "
                       "choose another name for the source's copy")


def prepare_source_parameters(rds, source: InstanceInfo, plan: SourcePlan, *, allow_reboot: bool) -> dict:
    """Copy and set the source's group as ``plan`` says (settle_parameter_group then attaches it and reboots);
    refuses before changing anything when a reboot is needed and not allowed."""
    result = {"source": source.identifier, "parameter_group": plan.parameter_group, "copied_from": None,
              "changed": dict(plan.changes), "already_enabled": plan.already_enabled}
    if plan.already_enabled:
        log.info("source %s already runs %s with the needed parameters: nothing to change, no reboot",
                 source.identifier, plan.parameter_group)
        return result
    if plan.needs_reboot and not allow_reboot:
        raise RdsError(_reboot_refusal(source, plan))
    if plan.copy_from and _describe_parameter_group(rds, plan.parameter_group) is None:
        _copy_parameter_group(rds, plan.copy_from, plan.parameter_group, source.identifier)
        result["copied_from"] = plan.copy_from
    ensure_parameter_group(rds, plan.parameter_group, parameter_group_family(source.engine_version),
                           f"pgactive-upgrade: parameters of {source.identifier}", plan.changes)
    return result


def _reboot_refusal(source: InstanceInfo, plan: SourcePlan) -> str:
    what = [f"set {', '.join(f'{k}={v}' for k, v in plan.changes.items())}"] if plan.changes else []
    if plan.copy_from:
        what.insert(0, f"copy parameter group {plan.copy_from} to {plan.parameter_group} and attach it")
    what.append("reboot the instance")
    return (f"source {source.identifier} must be rebooted to apply the replication parameters "
            f"({'; '.join(what)}): a brief outage of the production database. Nothing was changed. "
            "Set allow_source_reboot to true in the conf to let the upgrade do it, "
            "or apply the parameters and reboot the source yourself first")


def _copy_parameter_group(rds, source_group: str, name: str, identifier: str) -> None:
    rds.copy_db_parameter_group(
        SourceDBParameterGroupIdentifier=source_group, TargetDBParameterGroupIdentifier=name,
        TargetDBParameterGroupDescription=f"pgactive-upgrade: copy of {source_group} for {identifier}",
    )
    log.info("copied DB parameter group %s to %s for %s", source_group, name, identifier)


def _is_default_group(name: str | None) -> bool:
    return not name or name.startswith("default.")


def _group_values(rds, name: str | None) -> dict[str, str | None]:
    """Every parameter's effective value in the group (engine defaults included, unlike _user_parameters)."""
    if not name:
        return {}
    pages = rds.get_paginator("describe_db_parameters").paginate(DBParameterGroupName=name)
    return {p["ParameterName"]: p.get("ParameterValue") for page in pages for p in page["Parameters"]}


def _other_users(rds, group: str, identifier: str) -> list[str]:
    pages = rds.get_paginator("describe_db_instances").paginate()
    return sorted(i["DBInstanceIdentifier"] for page in pages for i in page["DBInstances"]
                  if i["DBInstanceIdentifier"] != identifier
                  and any(g.get("DBParameterGroupName") == group for g in i.get("DBParameterGroups", [])))


_BOOLEAN = {"1": "1", "on": "1", "true": "1", "yes": "1", "0": "0", "off": "0", "false": "0", "no": "0"}


def _unmet(wanted: dict[str, str], values: dict[str, str | None]) -> dict[str, str]:
    return {name: value for name, value in wanted.items() if not _satisfies(name, values.get(name), value)}


def _satisfies(name: str, have: str | None, want: str) -> bool:
    if have is None:
        return False
    if name in _REPLICATION_CAPACITY:  # minimums: a bigger value is fine. Formulas ({DBInstanceVCPU*2}) are unknown
        return have.isdigit() and int(have) >= int(want)
    return _BOOLEAN.get(have.strip().lower(), have) == _BOOLEAN.get(want.lower(), want)


# ---------------------------------------------------------------- decommission


def _describe_snapshot(rds, snapshot_id: str) -> dict | None:
    try:
        found = rds.describe_db_snapshots(DBSnapshotIdentifier=snapshot_id)["DBSnapshots"]
    except ClientError as error:
        if _error_code(error) == "DBSnapshotNotFound":
            return None
        raise
    return found[0] if found else None


def decommission(rds, identifier: str, *, final_snapshot_id: str) -> dict | Wait:
    """One step of deleting the instance with a final snapshot, without waiting: the result once it is gone,
    else what to wait for. Safe to re-run."""
    validate_identifier(final_snapshot_id, kind="final snapshot identifier", max_len=SNAPSHOT_MAX)
    info = describe_instance(rds, identifier)
    snapshot = _describe_snapshot(rds, final_snapshot_id)
    if snapshot is not None and snapshot.get("DBInstanceIdentifier") != identifier:
        raise RdsError(f"snapshot {final_snapshot_id} already exists and belongs to "
                       f"{snapshot.get('DBInstanceIdentifier')}, not {identifier}")
    if info is None:
        if snapshot is None:
            raise RdsError(f"DB instance {identifier} is gone but final snapshot {final_snapshot_id} does not exist; "
                           "refusing to report the decommission as done")
        return {"deleted": True, "snapshot": final_snapshot_id, "snapshot_status": snapshot.get("Status")}
    if info.status != "deleting":
        if info.deletion_protection:
            raise RdsError(f"DB instance {identifier} has deletion protection enabled; disable it deliberately "
                           "(modify-db-instance --no-deletion-protection) before decommissioning")
        if snapshot is not None:
            raise RdsError(f"snapshot {final_snapshot_id} already exists while {identifier} is still running; "
                           "it would not hold the final state: choose a new final snapshot id")
        if wait := _unless_busy(lambda: rds.delete_db_instance(
                DBInstanceIdentifier=identifier, SkipFinalSnapshot=False, FinalDBSnapshotIdentifier=final_snapshot_id,
                DeleteAutomatedBackups=False), identifier, f"deleting {identifier}"):
            return wait
        log.info("deleting DB instance %s with final snapshot %s", identifier, final_snapshot_id)
        if describe_instance(rds, identifier) is None:
            return decommission(rds, identifier, final_snapshot_id=final_snapshot_id)
    return Wait(identifier, DELETED, "deleting with a final snapshot")
