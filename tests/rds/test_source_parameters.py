"""Source parameters and the source-reboot rule (plan_source_parameters / prepare_source_parameters + settle_parameter_group) against moto.

moto facts these tests work around (see test_moto_facts): default groups hold no parameters, every
instance reports its group 'in-sync' at all times, and moto lets a default group be modified (RDS refuses).
Where RDS would report 'pending-reboot' or 'rebooting', an after-call hook on the client under test says so.
"""

import pytest

from pgactive_upgrade import rds as r
from rds_parts import SECRET, fail_first_calls, record_calls, settle

CUSTOM = "orders-db-pgactive"
DEFAULT = "default.postgres15"
PGACTIVE = r.pgactive_parameters("pgactive")
MUTATING = {"CopyDBParameterGroup", "CreateDBParameterGroup", "ModifyDBParameterGroup", "ModifyDBInstance",
            "RebootDBInstance", "ResetDBParameterGroup"}


def _plan(rds, source, driver="pgactive"):
    return r.plan_source_parameters(rds, source, driver, custom_group_name=CUSTOM)


def _apply(rds, source, plan, allow_reboot=True):
    """What configure_parameters does for the source: prepare the group, then settle it (attach, reboot)."""
    result = r.prepare_source_parameters(rds, source, plan, allow_reboot=allow_reboot)
    rebooted = not plan.already_enabled and settle(rds, source.identifier, plan.parameter_group,
                                                   may_reboot=allow_reboot, reboot=plan.needs_reboot)
    return {**result, "rebooted": rebooted}


def _params(rds, group):
    return {p["ParameterName"]: p["ParameterValue"] for p in
            rds.describe_db_parameters(DBParameterGroupName=group)["Parameters"]}


def _groups(rds):
    return sorted(g["DBParameterGroupName"] for g in rds.describe_db_parameter_groups()["DBParameterGroups"])


def _group_of(rds, identifier):
    return r.describe_instance(rds, identifier).parameter_group


def _state(rds):
    """Everything the source-parameter step could change: groups, their parameters, who uses which."""
    instances = {i["DBInstanceIdentifier"]: i["DBParameterGroups"][0]["DBParameterGroupName"]
                 for i in rds.describe_db_instances()["DBInstances"]}
    return instances, {g: _params(rds, g) for g in _groups(rds)}


def _custom_group(rds, name, values):
    r.ensure_parameter_group(rds, name, "postgres15", "team settings", values)


def _use_group(rds, identifier, group):
    rds.modify_db_instance(DBInstanceIdentifier=identifier, DBParameterGroupName=group, ApplyImmediately=True)
    rds.reboot_db_instance(DBInstanceIdentifier=identifier)


def _second_instance(rds, network, identifier="billing-db", group=None):
    rds.create_db_instance(DBInstanceIdentifier=identifier, Engine="postgres", EngineVersion="15.8",
                           DBInstanceClass="db.t3.micro", AllocatedStorage=20, MasterUsername="x",
                           MasterUserPassword=SECRET, DBSubnetGroupName=network["subnet_group"],
                           **({"DBParameterGroupName": group} if group else {}))


def _report_pending_reboot_until_rebooted(rds):
    """What RDS shows after a static parameter change or a new group: 'pending-reboot' until the next reboot."""
    rebooted = []

    def pending(parsed, **_):
        for instance in parsed.get("DBInstances", []):
            if instance["DBInstanceIdentifier"] == "orders-db" and not rebooted:
                instance["DBParameterGroups"][0]["ParameterApplyStatus"] = "pending-reboot"

    def reboot_done(parsed, **_):
        if "Error" not in parsed:  # after-call also fires for a fault injected by a before-call hook
            rebooted.append(True)

    rds.meta.events.register("after-call.rds.DescribeDBInstances", pending)
    rds.meta.events.register("after-call.rds.RebootDBInstance", reboot_done)


def _seed_default_group(rds):
    # moto's default groups are empty; these stand in for the engine defaults a real default group carries.
    seeded = {"shared_preload_libraries": "pg_stat_statements", "log_min_duration_statement": "500"}
    rds.modify_db_parameter_group(DBParameterGroupName=DEFAULT, Parameters=[
        {"ParameterName": k, "ParameterValue": v, "ApplyMethod": "pending-reboot"} for k, v in seeded.items()])
    return seeded


# ---------------------------------------------------------------- source on a default group


@pytest.mark.parametrize("driver", ["pgactive", "native"])
def test_plan_for_default_group_is_a_copy_and_a_reboot(rds, source, driver):
    calls = record_calls(rds)
    plan = _plan(rds, source, driver)
    assert plan == r.SourcePlan(parameter_group=CUSTOM, copy_from=DEFAULT, changes=r.pgactive_parameters(driver),
                                needs_reboot=True, already_enabled=False)
    assert ("rds.enable_pgactive" in plan.changes) == (driver == "pgactive")
    assert calls and not MUTATING & set(calls)


def test_refusal_without_allow_reboot_changes_nothing(rds, source):
    seeded = _seed_default_group(rds)
    before = _state(rds)
    plan = _plan(rds, source)
    calls = record_calls(rds)
    with pytest.raises(r.RdsError, match="allow_source_reboot") as refused:
        _apply(rds, source, plan, allow_reboot=False)
    assert not MUTATING & set(calls), calls
    assert _state(rds) == before
    assert _group_of(rds, "orders-db") == DEFAULT and _groups(rds) == [DEFAULT]
    message = str(refused.value)
    assert f"copy parameter group {DEFAULT} to {CUSTOM}" in message and "rds.enable_pgactive=1" in message
    assert "Nothing was changed" in message and _params(rds, DEFAULT) == seeded


def test_default_group_copied_with_its_settings_attached_and_rebooted(rds, source):
    seeded = _seed_default_group(rds)
    calls = record_calls(rds)
    result = _apply(rds, source, _plan(rds, source))
    assert result == {"source": "orders-db", "parameter_group": CUSTOM, "copied_from": DEFAULT,
                      "changed": PGACTIVE, "rebooted": True, "already_enabled": False}
    assert _params(rds, CUSTOM) == {**seeded, **PGACTIVE}
    assert _params(rds, DEFAULT) == seeded, "a default group is never modified"
    info = r.describe_instance(rds, "orders-db")
    assert (info.parameter_group, info.parameter_apply_status, info.status) == (CUSTOM, "in-sync", "available")
    assert calls.count("RebootDBInstance") == 1 and calls.count("CopyDBParameterGroup") == 1
    assert calls.index("CopyDBParameterGroup") < calls.index("ModifyDBInstance") < calls.index("RebootDBInstance")
    assert "ModifyDBParameterGroup" not in calls[:calls.index("CopyDBParameterGroup")]


def test_rerun_after_success_is_a_no_op(rds, source):
    _apply(rds, source, _plan(rds, source))
    before = _state(rds)
    calls = record_calls(rds)
    plan = _plan(rds, source)
    assert plan == r.SourcePlan(parameter_group=CUSTOM, copy_from=None, changes={}, needs_reboot=False,
                                already_enabled=True)
    again = _apply(rds, source, plan, allow_reboot=False)
    assert again == {"source": "orders-db", "parameter_group": CUSTOM, "copied_from": None, "changed": {},
                     "rebooted": False, "already_enabled": True}
    assert not MUTATING & set(calls) and _state(rds) == before


def test_stale_source_info_is_refreshed_by_plan(rds, source):
    _apply(rds, source, _plan(rds, source))
    assert source.parameter_group == DEFAULT  # the caller's cached InstanceInfo predates the change
    assert _plan(rds, source).already_enabled


# ---------------------------------------------------------------- source already enabled


def test_source_already_enabled_is_left_alone(rds, source):
    _custom_group(rds, "orders-team", {**PGACTIVE, "work_mem": "8192"})
    _use_group(rds, "orders-db", "orders-team")
    reboots = []
    rds.meta.events.register("before-call.rds.RebootDBInstance", lambda **_: reboots.append(True))
    calls = record_calls(rds)
    plan = _plan(rds, source)
    assert plan == r.SourcePlan(parameter_group="orders-team", copy_from=None, changes={}, needs_reboot=False,
                                already_enabled=True)
    result = _apply(rds, source, plan, allow_reboot=False)
    assert result["already_enabled"] and not result["rebooted"] and result["changed"] == {}
    assert reboots == [] and not MUTATING & set(calls)
    assert _groups(rds) == [DEFAULT, "orders-team"] and _group_of(rds, "orders-db") == "orders-team"


def test_enabled_source_with_larger_capacity_counts_as_enabled(rds, source):
    _custom_group(rds, "orders-team", {**PGACTIVE, "max_wal_senders": "40", "rds.enable_pgactive": "on"})
    _use_group(rds, "orders-db", "orders-team")
    assert _plan(rds, source).already_enabled


def test_capacity_formula_or_smaller_value_is_not_enough(rds, source):
    # RDS's default max_worker_processes is a formula; it may resolve below what pgactive needs.
    _custom_group(rds, "orders-team", {**PGACTIVE, "max_worker_processes": "GREATEST(${DBInstanceVCPU*2},8)",
                                       "max_replication_slots": "10"})
    _use_group(rds, "orders-db", "orders-team")
    plan = _plan(rds, source)
    assert plan.changes == {"max_worker_processes": "16", "max_replication_slots": "20"}
    assert plan.needs_reboot and not plan.already_enabled and plan.parameter_group == "orders-team"


def test_enabled_but_pending_reboot_needs_the_reboot(rds, source):
    _custom_group(rds, "orders-team", PGACTIVE)
    _use_group(rds, "orders-db", "orders-team")
    _report_pending_reboot_until_rebooted(rds)
    plan = _plan(rds, source)
    assert plan == r.SourcePlan(parameter_group="orders-team", copy_from=None, changes={}, needs_reboot=True,
                                already_enabled=False)
    with pytest.raises(r.RdsError, match="allow_source_reboot"):
        _apply(rds, source, plan, allow_reboot=False)
    result = _apply(rds, source, plan)
    assert result["rebooted"] and result["changed"] == {} and result["copied_from"] is None
    assert _plan(rds, source).already_enabled


def test_enabled_and_applying_waits_without_reboot(rds, source):
    """'applying' = dynamic values on their way: wait for in-sync, no reboot, so no permission needed."""
    _custom_group(rds, "orders-team", PGACTIVE)
    _use_group(rds, "orders-db", "orders-team")
    answers = []

    def applying(parsed, **_):
        answers.append(True)
        if len(answers) <= 3:
            parsed["DBInstances"][0]["DBParameterGroups"][0]["ParameterApplyStatus"] = "applying"

    rds.meta.events.register("after-call.rds.DescribeDBInstances", applying)
    calls = record_calls(rds)
    plan = _plan(rds, source)
    assert (plan.needs_reboot, plan.already_enabled, plan.changes) == (False, False, {})
    result = _apply(rds, source, plan, allow_reboot=False)
    assert not result["rebooted"] and not MUTATING & set(calls) and len(answers) > 3


# ---------------------------------------------------------------- custom groups: shared or not


def test_shared_custom_group_is_copied_not_modified(rds, source, network):
    _custom_group(rds, "team-shared", {"work_mem": "8192"})
    _use_group(rds, "orders-db", "team-shared")
    _second_instance(rds, network, group="team-shared")
    plan = _plan(rds, source)
    assert (plan.parameter_group, plan.copy_from, plan.changes) == (CUSTOM, "team-shared", PGACTIVE)
    result = _apply(rds, source, plan)
    assert result["copied_from"] == "team-shared" and result["rebooted"]
    assert _params(rds, "team-shared") == {"work_mem": "8192"}
    assert _params(rds, CUSTOM) == {"work_mem": "8192", **PGACTIVE}
    assert _group_of(rds, "orders-db") == CUSTOM and _group_of(rds, "billing-db") == "team-shared"


def test_custom_group_of_the_source_alone_is_modified_in_place(rds, source, network):
    _custom_group(rds, "orders-own", {"work_mem": "8192", "max_wal_senders": "30"})
    _use_group(rds, "orders-db", "orders-own")
    _second_instance(rds, network)  # on the default group: must not count as sharing orders-own
    plan = _plan(rds, source)
    wanted = {k: v for k, v in PGACTIVE.items() if k != "max_wal_senders"}  # 30 >= 20 already
    assert plan == r.SourcePlan(parameter_group="orders-own", copy_from=None, changes=wanted, needs_reboot=True,
                                already_enabled=False)
    calls = record_calls(rds)
    result = _apply(rds, source, plan)
    assert result == {"source": "orders-db", "parameter_group": "orders-own", "copied_from": None,
                      "changed": wanted, "rebooted": True, "already_enabled": False}
    assert _params(rds, "orders-own") == {"work_mem": "8192", "max_wal_senders": "30", **wanted}
    assert _groups(rds) == [DEFAULT, "orders-own"] and "CopyDBParameterGroup" not in calls
    assert calls.count("RebootDBInstance") == 1


def test_custom_name_already_used_by_another_instance_is_refused(rds, source, network):
    _custom_group(rds, CUSTOM, {"work_mem": "1"})
    _second_instance(rds, network, group=CUSTOM)
    with pytest.raises(r.RdsError, match=f"{CUSTOM} already exists and is used by billing-db"):
        _plan(rds, source)


def test_custom_name_of_other_family_is_refused(rds, source):
    r.ensure_parameter_group(rds, CUSTOM, "postgres17", "d", {})
    with pytest.raises(r.RdsError, match="family postgres17; source orders-db needs postgres15"):
        _plan(rds, source)


def test_source_on_shared_group_named_like_the_copy_is_refused(rds, source, network):
    _custom_group(rds, CUSTOM, {"work_mem": "1"})
    _use_group(rds, "orders-db", CUSTOM)
    _second_instance(rds, network, group=CUSTOM)
    with pytest.raises(r.RdsError, match="shared with other instances \\(billing-db\\)"):
        _plan(rds, source)


# ---------------------------------------------------------------- faults and interrupted runs


def test_busy_reboot_is_retried(rds, source):
    calls = fail_first_calls(rds, "RebootDBInstance", "InvalidDBInstanceState", times=1)
    result = _apply(rds, source, _plan(rds, source))
    assert calls == ["RebootDBInstance", "RebootDBInstance"] and result["rebooted"]
    assert _group_of(rds, "orders-db") == CUSTOM


def test_run_interrupted_before_attach_resumes(rds, source):
    fail_first_calls(rds, "ModifyDBInstance", "AccessDenied", times=1)
    with pytest.raises(r.RdsError, match="AccessDenied"):
        _apply(rds, source, _plan(rds, source))
    assert _group_of(rds, "orders-db") == DEFAULT and _params(rds, CUSTOM) == PGACTIVE  # copy left behind
    plan = _plan(rds, source)
    assert (plan.parameter_group, plan.copy_from, plan.changes, plan.needs_reboot) == (CUSTOM, DEFAULT, {}, True)
    calls = record_calls(rds)
    result = _apply(rds, source, plan)
    assert result["copied_from"] is None and result["rebooted"] and "CopyDBParameterGroup" not in calls
    assert _group_of(rds, "orders-db") == CUSTOM


def test_run_interrupted_before_reboot_resumes_with_the_reboot(rds, source):
    _report_pending_reboot_until_rebooted(rds)
    fail_first_calls(rds, "RebootDBInstance", "AccessDenied", times=1)
    with pytest.raises(r.RdsError, match="rebooting orders-db failed: AccessDenied"):
        _apply(rds, source, _plan(rds, source))
    plan = _plan(rds, source)
    assert plan == r.SourcePlan(parameter_group=CUSTOM, copy_from=None, changes={}, needs_reboot=True,
                                already_enabled=False)
    assert _apply(rds, source, plan)["rebooted"] and _plan(rds, source).already_enabled


def test_reboot_waits_through_rebooting_until_in_sync(rds, source):
    """moto reboots instantly; RDS shows 'rebooting' and then 'available' + 'pending-reboot' for a while."""
    after_reboot = []
    script = [("rebooting", "pending-reboot"), ("rebooting", "applying"), ("available", "pending-reboot")]

    def lagging(parsed, **_):
        if after_reboot:
            after_reboot.append(True)
            if len(after_reboot) - 1 <= len(script):
                status, apply = script[len(after_reboot) - 2]
                parsed["DBInstances"][0]["DBInstanceStatus"] = status
                parsed["DBInstances"][0]["DBParameterGroups"][0]["ParameterApplyStatus"] = apply

    rds.meta.events.register("after-call.rds.DescribeDBInstances", lagging)
    rds.meta.events.register("after-call.rds.RebootDBInstance", lambda **_: after_reboot.append(True))
    calls = record_calls(rds)
    result = _apply(rds, source, _plan(rds, source))
    assert result["rebooted"] and calls.count("RebootDBInstance") == 1, "the lagging answers never reboot it again"
    assert len(after_reboot) - 1 > len(script)  # every lagging answer was read, then the real 'available'/'in-sync'


def test_moto_facts_this_suite_relies_on(rds, source):
    """If moto starts behaving like RDS here, the hooks above can go."""
    assert _params(rds, DEFAULT) == {}
    _custom_group(rds, "orders-team", PGACTIVE)
    rds.modify_db_instance(DBInstanceIdentifier="orders-db", DBParameterGroupName="orders-team", ApplyImmediately=True)
    assert r.describe_instance(rds, "orders-db").parameter_apply_status == "in-sync"  # RDS: pending-reboot
    rds.modify_db_parameter_group(DBParameterGroupName=DEFAULT, Parameters=[
        {"ParameterName": "work_mem", "ParameterValue": "1", "ApplyMethod": "immediate"}])  # RDS refuses this
