"""include/pgactive_upgrade/rds.py against a real moto server (no boto3 patching); fixtures in conftest.py."""

import pytest
from botocore.exceptions import ClientError

from pgactive_upgrade import identifiers
from pgactive_upgrade import rds as r
from rds_parts import SECRET, fail_first_calls, new_client, record_calls, until_done


@pytest.fixture
def pg17_group(rds):
    params = r.pgactive_parameters("pgactive")
    r.ensure_parameter_group(rds, "orders-pgactive-17", "postgres17", "pgactive upgrade", params)
    return "orders-pgactive-17"


def _create_target(rds, source, group, **overrides):
    kwargs = dict(source=source, target_id="orders-db-pg17", engine_version="17.2", parameter_group=group,
                  master_password=SECRET, tags={"team": "sre"})
    return r.ensure_target_instance(rds, **{**kwargs, **overrides})


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("version,family", [("17.2", "postgres17"), ("15.8", "postgres15"), ("16", "postgres16"),
                                            ("9.6.20", "postgres9.6")])
def test_parameter_group_family(version, family):
    assert r.parameter_group_family(version) == family


@pytest.mark.parametrize("bad", ["", "latest", "17.x", "v17"])
def test_bad_engine_version_is_rejected(bad):
    with pytest.raises(r.RdsError, match="invalid PostgreSQL engine version"):
        r.parameter_group_family(bad)


def test_pgactive_parameters_per_driver():
    pgactive = r.pgactive_parameters("pgactive")
    assert pgactive["rds.enable_pgactive"] == "1" and pgactive["rds.logical_replication"] == "1"
    native = r.pgactive_parameters("native")
    assert "rds.enable_pgactive" not in native and native["rds.logical_replication"] == "1"
    assert int(native["max_replication_slots"]) >= 10 and int(pgactive["max_worker_processes"]) >= 16
    with pytest.raises(r.RdsError, match="unknown replication driver"):
        r.pgactive_parameters("bdr")


def test_target_identifier_naming():
    assert identifiers.target_identifier("orders-db", 17) == "orders-db-pg17"
    assert identifiers.target_identifier("orders-db-pg15", 17) == "orders-db-pg17"
    assert identifiers.target_identifier("arn:aws:rds:us-east-1:123456789012:db:orders-db", 17) == "orders-db-pg17"
    long_id = identifiers.target_identifier("a" * 58 + "-b-c", 17)
    assert len(long_id) <= 63 and long_id.endswith("-pg17") and "--" not in long_id


@pytest.mark.parametrize("bad", ["1db", "snap--1", "snap-", "snap_1", "", "a" * 256])
def test_snapshot_identifier_rules(bad):
    with pytest.raises(identifiers.IdentifierError, match="invalid final snapshot identifier"):
        identifiers.validate_identifier(bad, kind="final snapshot identifier", max_len=255)


def test_supports_pgactive():
    assert r.supports_pgactive("15.8") and r.supports_pgactive("17.0") and r.supports_pgactive("16")
    assert not r.supports_pgactive("14.9") and not r.supports_pgactive("15.3")


# ---------------------------------------------------------------- source


def test_resolve_source_by_arn_and_missing(rds, source):
    assert source.major == 15 and source.db_subnet_group == "orders-subnets" and source.multi_az
    assert r.resolve_source(rds, source.arn).identifier == "orders-db"
    assert r.describe_instance(rds, "no-such-db") is None
    with pytest.raises(r.RdsError, match="no-such-db not found"):
        r.resolve_source(rds, "no-such-db")


def test_resolve_source_rejects_non_postgres(rds, network):
    rds.create_db_instance(DBInstanceIdentifier="shop-mysql", Engine="mysql", EngineVersion="8.0.36",
                           DBInstanceClass="db.t3.micro", AllocatedStorage=20, MasterUsername="admin",
                           MasterUserPassword=SECRET)
    with pytest.raises(r.RdsError, match="engine 'mysql'"):
        r.resolve_source(rds, "shop-mysql")


# ---------------------------------------------------------------- parameter groups


def test_parameter_group_created_then_idempotent(rds):
    params = r.pgactive_parameters("pgactive")
    assert r.ensure_parameter_group(rds, "orders-pgactive-17", "postgres17", "d", params) is True
    stored = {p["ParameterName"]: p for p in
              rds.describe_db_parameters(DBParameterGroupName="orders-pgactive-17", Source="user")["Parameters"]}
    assert {k: v["ParameterValue"] for k, v in stored.items()} == params
    assert {v["ApplyMethod"] for v in stored.values()} == {"pending-reboot"}
    assert r.ensure_parameter_group(rds, "orders-pgactive-17", "postgres17", "d", params) is False


def test_parameter_group_changed_value_is_applied(rds):
    r.ensure_parameter_group(rds, "orders-native-17", "postgres17", "d", r.pgactive_parameters("native"))
    assert r.ensure_parameter_group(rds, "orders-native-17", "postgres17", "d", {"max_wal_senders": "30"}) is True
    values = {p["ParameterName"]: p["ParameterValue"] for p in
              rds.describe_db_parameters(DBParameterGroupName="orders-native-17", Source="user")["Parameters"]}
    assert values["max_wal_senders"] == "30"


def test_parameter_group_family_mismatch(rds):
    rds.create_db_parameter_group(DBParameterGroupName="orders-pgactive", DBParameterGroupFamily="postgres15",
                                  Description="old")
    with pytest.raises(r.RdsError, match="orders-pgactive exists with family postgres15, expected postgres17"):
        r.ensure_parameter_group(rds, "orders-pgactive", "postgres17", "d", {"rds.enable_pgactive": "1"})


# ---------------------------------------------------------------- target instance


def test_target_copies_source_attributes_and_never_leaks_password(rds, source, pg17_group, caplog):
    caplog.set_level("DEBUG", logger="pgactive_upgrade")
    target = _create_target(rds, source, pg17_group)
    target = r.describe_instance(rds, target.identifier)
    assert target.status == "available"
    assert (target.major, target.engine_version, target.parameter_group) == (17, "17.2", pg17_group)
    for field in ("instance_class", "allocated_storage", "storage_type", "db_subnet_group", "security_group_ids",
                  "multi_az", "storage_encrypted", "db_name", "master_username", "backup_retention_period"):
        assert getattr(target, field) == getattr(source, field), field
    tags = dict(target.tags)
    assert tags[r.SOURCE_TAG] == "orders-db" and tags["team"] == "sre"
    assert SECRET not in repr(target) and SECRET not in caplog.text


def test_second_call_reuses_target(rds, source, pg17_group):
    first = _create_target(rds, source, pg17_group)
    second = _create_target(rds, source, pg17_group)
    assert second.arn == first.arn
    ids = [i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]]
    assert sorted(ids) == ["orders-db", "orders-db-pg17"]


def test_existing_target_mismatch_is_named(rds, source, pg17_group):
    _create_target(rds, source, pg17_group)
    with pytest.raises(r.RdsError, match="instance class is 'db.r6g.large', expected 'db.r6g.xlarge'"):
        _create_target(rds, source, pg17_group, instance_class="db.r6g.xlarge")
    with pytest.raises(r.RdsError, match="DB subnet group is 'orders-subnets', expected 'other-subnets'"):
        _create_target(rds, source, pg17_group, db_subnet_group="other-subnets")


def test_unrelated_instance_with_target_name_is_not_adopted(rds, source, pg17_group, network):
    rds.create_db_instance(DBInstanceIdentifier="orders-db-pg17", Engine="postgres", EngineVersion="17.2",
                           DBInstanceClass="db.r6g.large", AllocatedStorage=100,
                           DBSubnetGroupName=network["subnet_group"], MasterUsername="x", MasterUserPassword=SECRET)
    with pytest.raises(r.RdsError, match="tag pgactive-upgrade:source is None, expected 'orders-db'"):
        _create_target(rds, source, pg17_group)


def test_target_version_and_group_validation(rds, source, pg17_group):
    with pytest.raises(r.RdsError, match="must be a higher major than source orders-db"):
        _create_target(rds, source, pg17_group, engine_version="15.10")
    r.ensure_parameter_group(rds, "orders-pgactive-16", "postgres16", "d", {})
    with pytest.raises(r.RdsError, match="needs postgres17"):
        _create_target(rds, source, "orders-pgactive-16")
    with pytest.raises(r.RdsError, match="missing-group does not exist"):
        _create_target(rds, source, "missing-group")
    assert r.describe_instance(rds, "orders-db-pg17") is None


# ---------------------------------------------------------------- parameter group attachment and reboot


def test_attach_group_and_reboot_source_in_one_step(rds, source):
    r.ensure_parameter_group(rds, "orders-pgactive-15", "postgres15", "d", r.pgactive_parameters("pgactive"))
    calls = record_calls(rds)
    assert r.settle_parameter_group(rds, "orders-db", "orders-pgactive-15", may_reboot=True) == (None, True)
    assert calls.index("ModifyDBInstance") < calls.index("RebootDBInstance")
    assert r.settle_parameter_group(rds, "orders-db", "orders-pgactive-15", may_reboot=True) == (None, False)
    info = r.describe_instance(rds, "orders-db")
    assert (info.status, info.parameter_group, info.parameter_apply_status) == ("available", "orders-pgactive-15", "in-sync")


def test_attach_group_of_wrong_family_refused(rds, source, pg17_group):
    with pytest.raises(r.RdsError, match="needs postgres15"):
        r.settle_parameter_group(rds, "orders-db", pg17_group, may_reboot=True)


def _report(rds, status=None, apply_status=None):
    def rewrite(parsed, **_):
        for instance in parsed.get("DBInstances", []):
            if status:
                instance["DBInstanceStatus"] = status
            if apply_status:
                instance["DBParameterGroups"][0]["ParameterApplyStatus"] = apply_status

    rds.meta.events.register("after-call.rds.DescribeDBInstances", rewrite)


def test_a_pending_reboot_reboots_and_applying_parameters_are_waited_for(rds, source):
    group = r.describe_instance(rds, "orders-db").parameter_group
    calls = record_calls(rds)
    _report(rds, apply_status="pending-reboot")
    wait, rebooted = r.settle_parameter_group(rds, "orders-db", group, may_reboot=True)
    assert rebooted and wait == r.Wait("orders-db", r.IN_SYNC, "rebooting"), "still pending right after the call"
    assert calls.count("RebootDBInstance") == 1

    other = new_client("rds")
    _report(other, apply_status="applying")
    assert r.settle_parameter_group(other, "orders-db", group, may_reboot=True) == (
        r.Wait("orders-db", r.IN_SYNC, "parameters applying"), False)


def test_a_reboot_the_conf_does_not_allow_is_refused(rds, source):
    group = r.describe_instance(rds, "orders-db").parameter_group
    calls = record_calls(rds)
    with pytest.raises(r.RdsError, match="orders-db must be rebooted .* set allow_source_reboot to true"):
        r.settle_parameter_group(rds, "orders-db", group, may_reboot=False, reboot=True)
    assert "RebootDBInstance" not in calls


def test_a_busy_instance_is_waited_for_not_slept_on(rds, source):
    group = r.describe_instance(rds, "orders-db").parameter_group
    calls = fail_first_calls(rds, "RebootDBInstance", "InvalidDBInstanceState", times=1)
    assert r.settle_parameter_group(rds, "orders-db", group, may_reboot=True, reboot=True) == (
        r.Wait("orders-db", r.AVAILABLE, "rebooting orders-db: instance busy"), False)
    assert r.settle_parameter_group(rds, "orders-db", group, may_reboot=True, reboot=True) == (None, True)
    assert calls == ["RebootDBInstance", "RebootDBInstance"]


def test_reboot_other_errors_are_not_retried(rds, source):
    group = r.describe_instance(rds, "orders-db").parameter_group
    calls = fail_first_calls(rds, "RebootDBInstance", "AccessDenied", times=10)
    with pytest.raises(r.RdsError, match="rebooting orders-db failed: AccessDenied"):
        r.settle_parameter_group(rds, "orders-db", group, may_reboot=True, reboot=True)
    assert len(calls) == 1


def test_a_dead_end_state_fails_at_once(rds, source):
    _report(rds, status="incompatible-parameters")
    with pytest.raises(r.RdsError, match="orders-db is in state 'incompatible-parameters'; expected 'available'"):
        r.settle_parameter_group(rds, "orders-db", "any", may_reboot=True)


def test_a_modifying_instance_is_waited_for_naming_its_state(rds, source):
    _report(rds, status="modifying")
    assert r.settle_parameter_group(rds, "orders-db", "any", may_reboot=True) == (
        r.Wait("orders-db", r.AVAILABLE, "status modifying"), False)


# ---------------------------------------------------------------- decommission


def test_decommission_with_final_snapshot_then_idempotent(rds, source):
    result = r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-1")
    assert result["deleted"] and result["snapshot"] == "orders-db-final-1"
    assert r.describe_instance(rds, "orders-db") is None
    snapshot = rds.describe_db_snapshots(DBSnapshotIdentifier="orders-db-final-1")["DBSnapshots"][0]
    assert snapshot["DBInstanceIdentifier"] == "orders-db"
    again = r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-1")
    assert again == result


def test_decommission_refuses_missing_instance_without_snapshot(rds):
    with pytest.raises(r.RdsError, match="gone but final snapshot orders-db-final-1 does not exist"):
        r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-1")


def test_decommission_refuses_deletion_protected_instance(rds, source):
    rds.modify_db_instance(DBInstanceIdentifier="orders-db", DeletionProtection=True, ApplyImmediately=True)
    with pytest.raises(r.RdsError, match="orders-db has deletion protection enabled"):
        r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-1")
    assert r.describe_instance(rds, "orders-db") is not None


def test_decommission_refuses_stale_snapshot_name(rds, source):
    rds.create_db_snapshot(DBInstanceIdentifier="orders-db", DBSnapshotIdentifier="orders-db-final-1")
    with pytest.raises(r.RdsError, match="already exists while orders-db is still running"):
        r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-1")
    assert r.describe_instance(rds, "orders-db") is not None


def test_decommission_rejects_invalid_snapshot_id_before_any_call(rds, source):
    with pytest.raises(identifiers.IdentifierError, match="must not contain '--'"):
        r.decommission(rds, "orders-db", final_snapshot_id="orders--final")
    assert r.describe_instance(rds, "orders-db") is not None


def test_decommission_waits_while_busy_then_deletes(rds, source):
    calls = fail_first_calls(rds, "DeleteDBInstance", "InvalidDBInstanceState", times=2)
    assert r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-2") == r.Wait(
        "orders-db", r.AVAILABLE, "deleting orders-db: instance busy")
    result = until_done(lambda: r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-2"))
    assert len(calls) == 3 and result["deleted"]


def test_decommission_waits_while_deleting(rds, source):
    _report(rds, status="deleting")
    assert r.decommission(rds, "orders-db", final_snapshot_id="orders-db-final-3") == r.Wait(
        "orders-db", r.DELETED, "deleting with a final snapshot")


def test_injected_fault_is_the_modeled_exception(rds, source):
    fail_first_calls(rds, "RebootDBInstance", "InvalidDBInstanceState")
    with pytest.raises(rds.exceptions.InvalidDBInstanceStateFault):
        rds.reboot_db_instance(DBInstanceIdentifier="orders-db")
    assert isinstance(rds.exceptions.InvalidDBInstanceStateFault, type) and issubclass(
        rds.exceptions.InvalidDBInstanceStateFault, ClientError)


# ---------------------------------------------------------------- the in-sync waiter (data, used by the trigger)


def _in_sync_waiter(rds):
    from pgactive_upgrade.airflow.rds_triggers import UpgradeRdsHook

    return UpgradeRdsHook(aws_conn_id=None, region_name="us-east-1").get_waiter("db_instance_parameters_in_sync",
                                                                              client=rds)


def test_the_in_sync_waiter_succeeds_on_available_and_in_sync(rds, source):
    _in_sync_waiter(rds).wait(DBInstanceIdentifier="orders-db", WaiterConfig={"Delay": 1, "MaxAttempts": 2})


def test_the_in_sync_waiter_waits_through_pending_reboot_and_fails_on_a_dead_end(rds, source):
    from botocore.exceptions import WaiterError

    _report(rds, apply_status="pending-reboot")
    with pytest.raises(WaiterError, match="Max attempts exceeded"):
        _in_sync_waiter(rds).wait(DBInstanceIdentifier="orders-db", WaiterConfig={"Delay": 1, "MaxAttempts": 2})
    other = new_client("rds")
    _report(other, status="incompatible-parameters")
    with pytest.raises(WaiterError, match="terminal failure state"):
        _in_sync_waiter(other).wait(DBInstanceIdentifier="orders-db", WaiterConfig={"Delay": 1, "MaxAttempts": 5})
