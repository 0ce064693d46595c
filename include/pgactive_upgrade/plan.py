"""The plan of an upgrade (conf `plan_only`): what the run would create, change and reboot, its steps, how long the
initial copy should take, which routes move in which phase, the cutover's fence and the rollback at each step.
Made from what the source, RDS and the traffic controller say now; reads only."""

from __future__ import annotations

import math

from pgactive_upgrade import catalog, fencing, rds
from pgactive_upgrade.catalog import META_SCHEMA
from pgactive_upgrade.db import connected
from pgactive_upgrade.replication import DRIVERS
from pgactive_upgrade.replication.base import MARKER_TABLE

# Initial copy rate of the local topology (PostgreSQL 15 -> 17 on one 2-core machine, native logical replication:
# 176 MB in 1.8-3.2 s, see local-topology docs); the slower end is used. Production rates differ (instance class,
# storage throughput, network, indexes): the estimate is an order of magnitude, not a promise.
COPY_RATE_BYTES_PER_SECOND = 55_000_000
COPY_RATE_MEASURED = ("measured on the local topology (PostgreSQL 15 -> 17 on one machine, native logical "
                      "replication, 176 MB in 1.8-3.2 s); the pgactive join was not measured separately")

DRIVER_STEPS = {
    "native": [
        "install_extension: the marker table {meta}.{marker} and the replication role's SELECT grants on the source",
        "build_replication: schema copy with the newest pg_dump (filters applied), publication {key} on the source, "
        "subscription {key}_fwd on the target (slot {key}_fwd on the source, initial copy of every selected table); "
        "application roles read-only on the target until cutover",
        "cutover: fence, marker catch-up, sequences moved, reverse replication (publication on the target, "
        "subscription {key}_rev on the source), forward subscription dropped, traffic switched",
    ],
    "pgactive": [
        "install_extension: the pgactive extension on both instances",
        "build_replication: a pgactive group created on the source, the target joins it (pgactive copies the whole "
        "database; waited for deferred), rows changed during the join sent again",
        "cutover: fence, marker catch-up, sequences moved, traffic switched (both nodes stay writable and replicate "
        "both ways)",
    ],
}

ROLLBACK = [
    ("validate_request / preflight", "nothing to undo: nothing was changed"),
    ("provision_target / configure_parameters", "every route back to the source (the target gets no traffic yet); "
                                                "the new instance and parameter groups stay until you delete them"),
    ("install_extension / build_replication / wait_for_sync / prepare_target",
     "every route back to the source; replication keeps running, the target is not contacted"),
    ("traffic_phase n", "every route back to 100 % source at once; replication keeps running"),
    ("verify_before_cutover / refresh_views_before_cutover", "every route back to the source"),
    ("cutover", "undone by itself on any failure or past cutover_deadline_seconds; a dead cutover is settled by the "
                "watchdog; after the switch, the rollback DAG reverses it"),
    ("verify (after cutover)", "native: fence the target, wait for its writes to reach the source through the "
                               "reverse replication, move sequences, switch every route back; pgactive: routes back"),
    ("detach_old_node / decommission_source", "refused: the old instance no longer receives writes"),
]


def make(upgrade, preflight_found: dict) -> dict:
    """The plan of `upgrade` (an Upgrade) from what RDS, the source and the traffic controller say now.
    preflight_found: {blocking: [...], warnings: [...]} from the preflight step."""
    request, source = upgrade.request, upgrade.source
    target = rds.describe_instance(upgrade.rds_client, upgrade.target_id)
    with connected(upgrade.endpoint(source), upgrade.admin) as connection:
        roles = upgrade.application_roles(connection)
        sessions = fencing.sessions_of(connection, upgrade.dbname, roles) if roles else []
        tables = catalog.tables(connection, request.filters)
        size = catalog.total_bytes(connection, tables)
    controller = upgrade.controller(target)
    blocking = list(preflight_found.get("blocking", []))
    resources, reboots = _resources_and_reboots(upgrade, target, blocking)
    return {
        "plan_only": True,
        "source": {"identifier": source.identifier, "engine_version": source.engine_version,
                   "instance_class": source.instance_class, "parameter_group": source.parameter_group},
        "target": {"identifier": upgrade.target_id, "engine_version": request.target_engine_version,
                   "exists": target is not None, "instance_class": request.instance_class or source.instance_class},
        "driver": request.replication_driver,
        "preflight": {"blocking": blocking, "warnings": preflight_found.get("warnings", [])},
        "resources": resources,
        "reboots": reboots,
        "steps": steps(request, upgrade.key),
        "copy_estimate": copy_estimate(size, len(tables)),
        "split_now": controller.read_split(),
        "phases": phases(upgrade, controller),
        "cutover": {"routes": [r.name for r in controller.routes], "fence_roles": roles,
                    "sessions_ended_now": sessions, "deadline_seconds": request.cutover_deadline_seconds},
        "decommission": ("detach the old node, final snapshot "
                         f"{request.final_snapshot_id or request.source_identifier + '-final-<run time>'}, delete "
                         f"{source.identifier}") if request.decommission == "delete"
                        else f"{source.identifier} kept, replicating from the target (rollback stays possible)",
        "rollback": rollback_path(),
    }


def _resources_and_reboots(upgrade, target, blocking: list[str]) -> tuple[list[dict], list[dict]]:
    request, source = upgrade.request, upgrade.source
    resources, reboots = [], []
    group = rds.planned_parameter_group(upgrade.rds_client, upgrade.parameter_group,
                                        rds.pgactive_parameters(request.replication_driver))
    resources.append({"kind": "DB parameter group", "name": upgrade.parameter_group,
                      "action": "modify" if group["exists"] and group["set"] else "keep" if group["exists"] else "create",
                      "detail": f"family {rds.parameter_group_family(request.target_engine_version)}, set {group['set']}"
                      if group["set"] else "already set"})
    if target is None:
        resources.append({"kind": "DB instance", "name": upgrade.target_id, "action": "create",
                          "detail": f"PostgreSQL {request.target_engine_version}, "
                                    f"{request.instance_class or source.instance_class}, parameter group "
                                    f"{upgrade.parameter_group}, the source's storage, subnet group, security groups "
                                    "and encryption unless the conf overrides them"})
    else:
        resources.append({"kind": "DB instance", "name": target.identifier, "action": "reuse",
                          "detail": f"exists ({target.status}, {target.engine_version})"})
        if target.parameter_group != upgrade.parameter_group or target.parameter_apply_status == "pending-reboot" \
                or group["set"]:
            reboots.append({"role": "target", "instance": target.identifier,
                            "why": f"to apply parameter group {upgrade.parameter_group}"})
    try:
        source_plan = upgrade.source_parameter_plan()
    except rds.RdsError as error:
        blocking.append(str(error))
        source_plan = None
    if source_plan is not None and not source_plan.already_enabled:
        if source_plan.copy_from:
            resources.append({"kind": "DB parameter group", "name": source_plan.parameter_group, "action": "create",
                              "detail": f"copy of {source_plan.copy_from} with {source_plan.changes}, attached to "
                                        f"{source.identifier}"})
        elif source_plan.changes:
            resources.append({"kind": "DB parameter group", "name": source_plan.parameter_group, "action": "modify",
                              "detail": f"set {source_plan.changes} (the source's own group)"})
        if source_plan.needs_reboot:
            allowed = "allowed by allow_source_reboot" if request.allow_source_reboot else \
                "NOT allowed: preflight stops the run unless allow_source_reboot is true"
            reboots.append({"role": "source", "instance": source.identifier,
                            "why": f"to apply {source_plan.parameter_group} (a brief outage of production; {allowed})"})
    resources += _database_objects(upgrade)
    resources.append({"kind": "traffic", "name": request.traffic["controller"], "action": "modify",
                      "detail": "weights of the routes, per phase and at cutover"})
    if request.decommission == "delete":
        resources.append({"kind": "DB snapshot", "name": request.final_snapshot_id or
                          f"{request.source_identifier}-final-<run time>", "action": "create",
                          "detail": "final snapshot of the source"})
        resources.append({"kind": "DB instance", "name": source.identifier, "action": "delete",
                          "detail": "after the final snapshot, once the target is the settled writer"})
    return resources, reboots


def _database_objects(upgrade) -> list[dict]:
    key, request = upgrade.key, upgrade.request
    objects = [{"kind": "schema", "name": META_SCHEMA, "action": "create",
                "detail": "on the source (switch state, fence record, marker table), copied to the target"},
               {"kind": "schema copy", "name": upgrade.target_id, "action": "create",
                "detail": "the selected schemas and tables, with the newest pg_dump"}]
    if request.replication_driver == "native":
        objects += [{"kind": "publication", "name": key, "action": "create", "detail": "on the source"},
                    {"kind": "subscription and slot", "name": f"{key}_fwd", "action": "create",
                     "detail": "subscription on the target, slot on the source"},
                    {"kind": "publication, subscription and slot", "name": f"{key}_rev", "action": "create",
                     "detail": "at cutover: target -> source"}]
    else:
        objects += [{"kind": "pgactive group", "name": key, "action": "create",
                     "detail": "the extension on both instances, the group on the source, the target joins"}]
    return objects


def steps(request, key: str) -> list[str]:
    return ["validate_request, preflight", "provision_target: parameter group and instance",
            "configure_parameters: attach the groups, reboot where listed under reboots",
            *driver_steps(request.replication_driver, key)[:2],
            "wait_for_sync: until lag is under lag_threshold_bytes",
            "prepare_target: ALTER EXTENSION ... UPDATE where the target has newer versions, materialized views "
            "refreshed, ANALYZE of every replicated table",
            "traffic_phase per shift_percentages: shift, settle, health and latency checks",
            "verify_before_cutover", "refresh_views_before_cutover",
            *driver_steps(request.replication_driver, key)[2:],
            "verify (every row and sequence)",
            "detach_old_node, decommission_source" + ("" if request.decommission == "delete" else
                                                      " (skipped: decommission is keep)")]


def phases(upgrade, controller) -> list[dict]:
    request = upgrade.request
    routes = upgrade.movable_routes(controller, DRIVERS[request.replication_driver])
    planned = []
    for percent in request.shift_percentages:
        if not routes:
            planned.append({"percent": percent, "routes": [], "note": "one-way replication: writes move only at "
                                                                       "cutover"})
        elif request.shift_mode == "units":
            moved = routes[: math.ceil(len(routes) * percent / 100)]
            planned.append({"percent": percent, "routes": moved, "note": "whole routes: 100 % of each on the target"})
        else:
            planned.append({"percent": percent, "routes": routes, "note": f"{percent} % of each on the target"})
    return planned


def copy_estimate(total_bytes: int, tables: int, rate: float = COPY_RATE_BYTES_PER_SECOND) -> dict:
    return {"tables": tables, "bytes": total_bytes, "rate_bytes_per_second": rate,
            "seconds": math.ceil(total_bytes / rate) if total_bytes else 0, "rate_source": COPY_RATE_MEASURED}


def driver_steps(driver: str, key: str) -> list[str]:
    return [step.format(key=key, meta=META_SCHEMA, marker=MARKER_TABLE) for step in DRIVER_STEPS[driver]]


def rollback_path() -> list[dict]:
    return [{"after": step, "rollback": what} for step, what in ROLLBACK]


def summary(plan: dict) -> str:
    """The plan as text for the task log."""
    lines = [f"PLAN for {plan['source']['identifier']} ({plan['source']['engine_version']}) -> "
             f"{plan['target']['identifier']} ({plan['target']['engine_version']}), driver {plan['driver']}. "
             "Nothing was created, changed or rebooted."]
    blocking = plan["preflight"]["blocking"]
    lines.append("Preflight: " + ("BLOCKS THE RUN: " + "; ".join(blocking) if blocking else "passes")
                 + f" ({len(plan['preflight']['warnings'])} warnings)")
    lines += [f"  warning [{w.get('check')}]: {w.get('message')}" for w in plan["preflight"]["warnings"]]
    lines.append("Resources:")
    lines += [f"  {r['action']:<8} {r['kind']} {r['name']}" + (f": {r['detail']}" if r.get("detail") else "")
              for r in plan["resources"]]
    lines.append("Reboots:" + ("" if plan["reboots"] else " none"))
    lines += [f"  {r['role']} {r['instance']}: {r['why']}" for r in plan["reboots"]]
    lines.append("Steps:")
    lines += [f"  {step}" for step in plan["steps"]]
    estimate = plan["copy_estimate"]
    lines.append(f"Initial copy: {estimate['tables']} tables, {estimate['bytes'] / 1e6:.1f} MB, about "
                 f"{estimate['seconds']} s at {estimate['rate_bytes_per_second'] / 1e6:.0f} MB/s "
                 f"({estimate['rate_source']})")
    lines.append("Phases:" + ("" if plan["phases"] else " none (every route moves at cutover)"))
    lines += [f"  {p['percent']} %: {', '.join(p['routes']) or 'no route moves'}" + (f" ({p['note']})" if p.get("note") else "")
              for p in plan["phases"]]
    fence = plan["cutover"]
    lines.append(f"Cutover: routes {', '.join(fence['routes'])} to the target within {fence['deadline_seconds']} s; "
                 f"fence roles {', '.join(fence['fence_roles']) or '(none)'}; "
                 f"{len(fence['sessions_ended_now'])} sessions would be ended now")
    lines += [f"  would end: {s}" for s in fence["sessions_ended_now"][:50]]
    lines.append(f"After cutover: {plan['decommission']}")
    lines.append("Rollback:")
    lines += [f"  after {r['after']}: {r['rollback']}" for r in plan["rollback"]]
    return "\n".join(lines)
