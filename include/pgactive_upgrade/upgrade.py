"""One upgrade, step by step: each method is one DAG task, idempotent, plain Python."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Iterator
from typing import Any

import psycopg2

from pgactive_upgrade import (
    catalog, fencing, health, identifiers, join_repair, latency, matviews, plan, preflight, rds, sequences, statistics,
    switch_state, verify,
)
from pgactive_upgrade.config import UpgradeRequest
from pgactive_upgrade.preflight import Context as PreflightContext
from pgactive_upgrade.preflight import Finding
from pgactive_upgrade.cutover import Cutover
from pgactive_upgrade.db import Credentials, Endpoint, connect, connected, override_endpoint, server_major
from pgactive_upgrade.deployment import Deployment, DeploymentError
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication import DRIVERS, Joining, Lag, Link, Node, ReplicationDriver, driver_for
from pgactive_upgrade.replication.base import HealthLimits
from pgactive_upgrade.rollback import Rollback
from pgactive_upgrade.switch_state import CUTOVER, DETACH, SwitchState
from pgactive_upgrade.tools import find_program
from pgactive_upgrade.traffic import build_controller
from pgactive_upgrade.traffic.base import TrafficController


class PreflightError(RuntimeError):
    def __init__(self, message: str, warnings: list[dict] | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.warnings = warnings or []  # what preflight found besides the blocking problems
        self.problems = problems or [message]


class AlreadySwitchedError(RuntimeError):
    """A cutover went ahead (or was rolled back, or the old node detached): steps before cutover may not act."""


@dataclass
class Upgrade:
    request: UpgradeRequest
    rds_client: object
    admin: Credentials = field(repr=False)
    replication: Credentials = field(repr=False)
    probe: Credentials | None = field(default=None, repr=False)  # the health probes' read-only role
    dbname: str = "postgres"
    route53_client: object | None = None
    deployment: Deployment | None = None  # what the deployment allows (None: not checked, outside Airflow)
    # Source and target as an earlier step of the run recorded them (recorded_instances): a later step that only
    # connects to them needs no RDS call, and at fleet scale spares the RDS API (and each task an AWS client).
    known_instances: dict[str, rds.InstanceInfo] = field(default_factory=dict, repr=False)
    _driver: ReplicationDriver | None = field(default=None, init=False, repr=False)
    last_latency: latency.Comparison | None = field(default=None, init=False, repr=False)  # of the last health check

    # --- what the upgrade acts on -------------------------------------------------------------
    @cached_property
    def source(self) -> rds.InstanceInfo:
        info = self._known("source", self.request.source_identifier) or rds.resolve_source(
            self.rds_client, self.request.source_instance)
        self._check_allowed(info)
        return info

    def _check_allowed(self, info: rds.InstanceInfo) -> None:
        """By identifier or by tags, before the run acts on it."""
        if self.deployment is not None:
            problems = self.deployment.source_problems(info.identifier, dict(info.tags))
            if problems:
                raise DeploymentError("refused by the deployment configuration: " + "; ".join(problems))

    @property
    def target_id(self) -> str:
        return self.request.target_instance or identifiers.target_identifier(self.source.identifier, self.request.target_major)

    @property
    def parameter_group(self) -> str:
        return f"{self.target_id}-{self.request.replication_driver}"

    def target(self) -> rds.InstanceInfo:
        info = self._target_if_exists()
        if info is None:
            raise rds.RdsError(f"{self.target_id}: target instance does not exist yet (run provision_target)")
        return info

    def _target_if_exists(self) -> rds.InstanceInfo | None:
        return self._known("target", self.target_id) or rds.describe_instance(self.rds_client, self.target_id)

    def _source_now(self) -> rds.InstanceInfo | None:
        """The source as RDS describes it now (None once deleted), refused if the deployment no longer allows it
        (its tags may have changed since the run recorded it): for the steps that end the way back to it."""
        found = rds.describe_instance(self.rds_client, self.request.source_instance)
        if found is not None:
            self._check_allowed(found)
        return found

    def _known(self, role: str, identifier: str) -> rds.InstanceInfo | None:
        info = self.known_instances.get(role)
        return info if info is not None and info.identifier == identifier else None

    def describe_instances(self) -> dict[str, dict]:
        """Source and target as RDS describes them now, for the later steps of the run (known_instances)."""
        source = rds.resolve_source(self.rds_client, self.request.source_instance)
        return {"source": source.as_dict(), "target": self.target().as_dict()}

    def endpoint(self, info: rds.InstanceInfo) -> Endpoint:
        host, port = override_endpoint(info.identifier, info.endpoint_host, info.endpoint_port, self.request.endpoint_overrides)
        if (host, port) == (info.endpoint_host, info.endpoint_port):
            return Endpoint(host, port, self.dbname)
        return Endpoint(host, port, self.dbname, server_host=info.endpoint_host or "", server_port=info.endpoint_port or 0)

    def tables(self) -> list[catalog.Table]:
        with connected(self.endpoint(self.source), self.admin) as connection:
            return catalog.tables(connection, self.request.filters)

    def link(self) -> Link:
        source, target = self.endpoint(self.source), self.endpoint(self.target())
        return Link(
            source=Node(self.source.identifier, source, source),
            target=Node(self.target_id, target, target),
            admin=self.admin,
            replication=self.replication,
            tables=tuple(self.tables()),
            filters=self.request.filters,
        )

    def driver(self) -> ReplicationDriver:
        """One driver per Upgrade (one task): building it describes the target and lists the source's tables."""
        if self._driver is None:
            self._driver = driver_for(self.request.replication_driver, self.link())
            self._driver.health_limits = HealthLimits(self.request.lag_threshold_bytes,
                                                      self.request.max_open_transaction_seconds)
        return self._driver

    def controller(self, target: rds.InstanceInfo | None = None) -> TrafficController:
        target = target or self._target_if_exists()
        target_address = self._address(target) if target else self._address(self.source)
        return build_controller(
            self.request.traffic,
            source_endpoint=self._address(self.source),
            target_endpoint=target_address,
            route53_client=self.route53_client,
        )

    def _address(self, info: rds.InstanceInfo) -> tuple[str, int]:
        if self.request.traffic["controller"] == "route53":
            return override_endpoint(info.identifier, info.endpoint_host, info.endpoint_port, {})
        endpoint = self.endpoint(info)
        return endpoint.host, endpoint.port

    def application_roles(self, connection) -> list[str]:
        """The roles to fence; those a fence already holds (they cannot log in now) count too."""
        exclude = (self.admin.user, self.replication.user) + ((self.probe.user,) if self.probe else ())
        roles = fencing.application_roles(connection, self.request.application_roles, exclude)
        return sorted(set(roles) | set(fencing.fenced_roles(connection)))

    @property
    def key(self) -> str:
        """The upgrade's key on the databases (its state row and lock)."""
        return Link.key_of(self.source.identifier)

    def check_not_switched(self, source_connection) -> None:
        """The durable switch state on the source, not the Airflow record (a watchdog may have settled a cutover
        whose task never reported): only no switch, or an undone cutover, lets pre-cutover steps act."""
        state = switch_state.read(source_connection, self.key)
        if state is not None and (state.writer == "target" or state.direction != CUTOVER):
            raise AlreadySwitchedError(
                f"{self.source.identifier}: the switch state says {state.direction} {state.phase} "
                f"(at {state.updated_at}); traffic and replication before cutover cannot change any more"
            )

    @contextmanager
    def acting(self, halted=lambda: None, wait_seconds: float | None = None) -> Iterator:
        """Hold the upgrade's lock on the source while a step changes traffic or replication; `halted` is checked
        under it, so a rollback (which sets the halt flag, then takes the lock) never races a step that acts."""
        wait = self.request.cutover_deadline_seconds + 30 if wait_seconds is None else wait_seconds
        with connected(self.endpoint(self.source), self.admin, connect_timeout=5) as connection:
            with switch_state.locked(connection, self.key, wait):
                halted()
                yield connection

    # --- steps ---------------------------------------------------------------------------------
    def preflight(self) -> dict:
        """Everything that can be checked before anything changes (see preflight.py): raises PreflightError naming
        each blocking problem; warnings are carried in the result, each naming the step that handles it."""
        source = self.source
        plan = self.source_parameter_plan()
        with connected(self.endpoint(source), self.admin) as connection, self._target_connection() as target:
            context = self._preflight_context(connection, target, plan)
            findings = preflight.run(preflight.checks_for(context), context)
        findings += self._tool_findings() + self._parameter_findings()
        split = self._read_split(findings)
        problems = [f.message for f in findings if f.blocks]
        warnings = [f.as_dict() for f in findings if not f.blocks]
        if problems:
            raise PreflightError("preflight failed: " + "; ".join(problems), warnings, problems)
        result: dict[str, Any] = {"source": source.identifier, "engine_version": source.engine_version, "tables": len(context.tables),
                  "application_roles": context.application_roles, "split": split,
                  "source_needs_reboot": plan.needs_reboot, "warnings": warnings}
        emit("preflight_passed", **{**result, "warnings": len(warnings)})
        for warning in warnings:
            emit("preflight_warning", **warning)
        return result

    def _preflight_context(self, source, target, plan: rds.SourcePlan | None) -> PreflightContext:
        return PreflightContext(
            source=source, request=self.request, tables=catalog.tables(source, self.request.filters),
            source_info=self.source, replication_user=self.replication.user,
            application_roles=self.application_roles(source), plan=plan, target=target, target_id=self.target_id,
            target_parameter_group=self.parameter_group,
        )

    @contextmanager
    def _target_connection(self) -> Iterator:
        """The target's admin connection when the target exists and answers, else None (before provisioning)."""
        info = rds.describe_instance(self.rds_client, self.target_id)
        try:
            connection = connect(self.endpoint(info), self.admin, connect_timeout=5) if info else None
        except Exception:
            connection = None
        try:
            yield connection
        finally:
            if connection is not None:
                connection.close()

    def _tool_findings(self) -> list[Finding]:
        try:
            find_program("pg_dump", self.request.target_major)
        except Exception as error:
            return [preflight.block("pg_dump", str(error))]
        return []

    def _parameter_findings(self) -> list[Finding]:
        """The target's group gets the driver's parameters only: name the source's other custom ones, and the
        source's own values of those the driver sets."""
        driver_sets = rds.pgactive_parameters(self.request.replication_driver)
        source = rds.custom_parameters(self.rds_client, self.source.parameter_group)
        target = rds.custom_parameters(self.rds_client, self.parameter_group) or driver_sets
        return preflight.parameter_findings(source, target, driver_sets, self.source.parameter_group or "(none)",
                                            self.parameter_group)

    def make_plan(self, preflight_found: dict) -> dict:
        """What a run of this conf would do (plan.py); changes nothing. preflight_found: {blocking, warnings}."""
        made = plan.make(self, preflight_found)
        emit("plan_made", resources=len(made["resources"]), reboots=len(made["reboots"]),
             blocking=len(made["preflight"]["blocking"]), copy_seconds=made["copy_estimate"]["seconds"])
        return made

    def check_target(self) -> None:
        """The preflight checks that need the target (extensions, database locale, roles, capacity), once it answers."""
        with connected(self.endpoint(self.source), self.admin) as source, connected(
            self.endpoint(self.target()), self.admin
        ) as target:
            context = self._preflight_context(source, target, plan=None)
            problems = [f.message for f in preflight.run(preflight.TARGET_CHECKS, context) if f.blocks]
        if problems:
            raise PreflightError(f"{self.target_id}: " + "; ".join(problems))

    def _read_split(self, findings: list[Finding]) -> dict:
        try:
            return self.controller().read_split()
        except Exception as error:
            findings.append(preflight.block("traffic", f"traffic: cannot read the current split: {error}"))
            return {}

    def prepare_target(self, progress=lambda figures: None) -> dict:
        """After the initial sync, before any traffic reaches the target: what replication does not carry.
        Extensions first (an update may change types and operators), then the materialized views, then the
        planner statistics of every replicated table and refreshed view. progress: called as ANALYZE goes on."""
        with connected(self.endpoint(self.source), self.admin) as connection:
            self.check_not_switched(connection)
        target = self.endpoint(self.target())
        with connected(target, self.admin) as connection:
            extensions = statistics.update_extensions(connection)
        emit("extensions_updated", count=len(extensions), extensions=[e["name"] for e in extensions])
        views = self._refresh_materialized_views()
        refreshed = [f"{schema}.{name}" for schema, name in views]
        relations = [(t.schema, t.name) for t in self.tables()] + views

        def report(figures: dict) -> None:
            emit("analyze_progress", **figures)
            progress(figures)

        analyzed = statistics.analyze(target, self.admin, relations, self.request.analyze_parallelism, report)
        emit("statistics_collected", **analyzed)
        return {"refreshed": refreshed, "extensions_updated": extensions, "statistics": analyzed}

    def refresh_materialized_views(self) -> dict:
        """Materialized views arrive empty on the target: refresh each there (after the initial sync, before reads
        move). Idempotent."""
        return {"refreshed": [f"{schema}.{name}" for schema, name in self._refresh_materialized_views()]}

    def _refresh_materialized_views(self) -> list[tuple[str, str]]:
        with connected(self.endpoint(self.target()), self.admin) as target:
            refreshed = matviews.refresh_all(target, self.request.filters)
        emit("materialized_views_refreshed", count=len(refreshed), views=[f"{s}.{n}" for s, n in refreshed])
        return refreshed

    def provision_target(self) -> dict:
        if self.admin.token is not None and rds.describe_instance(self.rds_client, self.target_id) is None:
            raise PreflightError(f"db_conn_id: the admin connection uses IAM authentication, so no password exists for "
                                 f"the new instance's master user: create {self.target_id} beforehand with IAM "
                                 "authentication enabled and rds_iam granted to the admin role (README, Deployment "
                                 "security)")
        family = rds.parameter_group_family(self.request.target_engine_version)
        rds.ensure_parameter_group(
            self.rds_client, self.parameter_group, family,
            f"pgactive-upgrade of {self.source.identifier}", rds.pgactive_parameters(self.request.replication_driver),
        )
        info = rds.ensure_target_instance(
            self.rds_client,
            source=self.source,
            target_id=self.target_id,
            engine_version=self.request.target_engine_version,
            parameter_group=self.parameter_group,
            instance_class=self.request.instance_class or None,
            db_subnet_group=self.request.db_subnet_group or None,
            security_group_ids=list(self.request.security_group_ids) or None,
            master_password=self.admin.password,
            tags={"pgactive-upgrade:source": self.source.identifier},
        )
        emit("target_provisioned", target_instance=info.identifier, status=info.status, instance_class=info.instance_class)
        return {"target": info.identifier, "status": info.status, "parameter_group": self.parameter_group}

    def source_parameter_plan(self) -> rds.SourcePlan:
        return rds.plan_source_parameters(
            self.rds_client, self.source, self.request.replication_driver,
            custom_group_name=f"{self.source.identifier}-{self.request.replication_driver}",
        )

    def configure_parameters(self) -> dict | rds.Wait:
        """One step towards both instances running their replication parameters in-sync, both moved on in each
        call: the source's group attached (and rebooted, only with allow_source_reboot), so that its reboot passes
        while the target is still being created, and the target's group attached (and rebooted). Returns what to
        wait for while an instance is busy, the source first (its reboot is waited for until its parameters are
        in-sync before it is looked at again); the step runs again afterwards and goes on from what RDS reports."""
        family = rds.parameter_group_family(self.request.target_engine_version)
        changed = rds.ensure_parameter_group(
            self.rds_client, self.parameter_group, family,
            f"pgactive-upgrade of {self.source.identifier}", rds.pgactive_parameters(self.request.replication_driver),
        )
        rds.usable_instance(self.rds_client, self.target_id)  # a target that failed stops the run before the source reboots
        plan = self.source_parameter_plan()
        source = rds.prepare_source_parameters(self.rds_client, self.source, plan,
                                               allow_reboot=self.request.allow_source_reboot)
        source_wait = None
        if not plan.already_enabled:
            source_wait, rebooted = rds.settle_parameter_group(
                self.rds_client, self.source.identifier, plan.parameter_group,
                may_reboot=self.request.allow_source_reboot, reboot=plan.needs_reboot)
            self._note_reboot("source", self.source.identifier, rebooted)
        target_wait, rebooted = rds.settle_parameter_group(self.rds_client, self.target_id, self.parameter_group,
                                                           may_reboot=True, reboot=changed)
        self._note_reboot("target", self.target_id, rebooted)
        if wait := source_wait or target_wait:
            return wait
        emit("parameters_applied", target_instance=self.target_id, source_parameter_group=plan.parameter_group)
        return {"parameter_group": self.parameter_group, "source": source}

    @staticmethod
    def _note_reboot(role: str, identifier: str, rebooted: bool) -> None:
        if rebooted:
            emit("instance_rebooted", role=role, instance=identifier)

    def install(self) -> dict:
        with connected(self.endpoint(self.target()), self.admin) as connection:
            major = server_major(connection)
        if major != self.request.target_major:
            raise PreflightError(f"{self.target_id}: server answers as PostgreSQL {major}, expected {self.request.target_major}")
        self.check_target()
        with connected(self.endpoint(self.source), self.admin) as connection:  # before any replication is set up
            switch_state.ensure_table(connection)
            fencing.ensure_record_table(connection)
        return self.driver().install()

    def build_group(self) -> dict | Joining:
        with connected(self.endpoint(self.source), self.admin) as connection:
            self.check_not_switched(connection)
        driver = self.driver()
        result = driver.build(wait=False)
        if isinstance(result, Joining):  # pgactive copying the database: waited for in the triggerer
            return result
        if driver.active_active:
            result["join_repair"] = self._repair_join()
        else:
            target = self.endpoint(self.target())
            with connected(target, self.admin) as connection:
                fencing.set_read_only(connection, target.dbname, self.application_roles(connection))
        emit("replication_started", **{k: v for k, v in result.items() if k != "created"})
        return result

    def _repair_join(self) -> dict:
        """What the join lost, sent again (join_repair.py); only while no route sends anything to the target, the
        source then being the only node applications write to."""
        split = self.controller().read_split()
        if any(split.values()):
            emit("join_repair_skipped", reason="traffic already reaches the target", split=split)
            return {"skipped": True, "split": split}
        return join_repair.repair(self.endpoint(self.source), self.endpoint(self.target()), self.admin, self.tables(),
                                  parallelism=self.request.verify_parallelism)

    def lag(self) -> Lag:
        return self.driver().lag()

    def movable_routes(self, controller: TrafficController, driver: ReplicationDriver) -> list[str]:
        """Routes that may move before cutover: all with active-active replication, else read-only ones."""
        return [r.name for r in controller.routes if driver.active_active or not r.carries_writes]

    def shift(self, percent: int) -> dict:
        driver, controller = self.driver(), self.controller()
        routes = self.movable_routes(controller, driver)
        if not routes:
            emit("phase_skipped", percent=percent, reason="one-way replication: writes move only at cutover")
            return {"percent": percent, "routes": [], "split": controller.read_split()}
        if self.request.shift_mode == "units":
            moved = routes[: math.ceil(len(routes) * percent / 100)]
            controller.set_target_percent(100, moved)
            split = controller.set_target_percent(0, routes[len(moved):]) if routes[len(moved):] else controller.read_split()
        else:
            split = controller.set_target_percent(percent, routes)
        emit("phase_shifted", percent=percent, routes=routes, split=split)
        return {"percent": percent, "routes": routes, "split": split}

    def conflict_marks(self) -> dict:
        """Where each node's conflict history stands now (active-active drivers); {} when the driver has none."""
        return self.driver().conflict_marks()

    def health_check(self, conflict_baseline: dict | None = None,
                     apply_error_baseline: dict | None = None) -> health.HealthReport:
        """What a phase's checks find, sorted by what happens next (see health.HealthReport).
        conflict_baseline: conflicts an operator already saw (see conflict_marks); only later ones count;
        apply_error_baseline: the same for apply errors (a report's apply_error_marks)."""
        driver = self.driver()
        if conflict_baseline is not None:
            driver.conflict_baseline = conflict_baseline
        if apply_error_baseline is not None:
            driver.apply_error_baseline = apply_error_baseline
        problems = driver.problems(conflicts=False, apply_errors=False)
        marks = driver.conflict_marks()  # before the listing: what is listed is exactly what the marks cover
        conflicts = driver.conflicts(up_to=marks)
        errors = driver.apply_errors()
        lag = driver.lag()
        report = health.HealthReport(lag=lag, threshold_bytes=self.request.lag_threshold_bytes, problems=problems,
                                     conflicts=conflicts, conflict_marks=marks, apply_errors=errors.named,
                                     apply_error_marks=errors.marks)
        if report.lag_high:
            report.lag_causes = driver.lag_causes(lag)
        probe_problems = self._probe_problems()
        report.problems += probe_problems
        reachable = not any(p.startswith("target does not accept connections") for p in probe_problems)
        if self.probe is not None and reachable:
            try:
                report.problems += self.compare_latency().problems
            except psycopg2.Error as error:  # a node unreachable now: the phase cannot be judged healthy
                report.problems.append(f"latency comparison could not run: {latency.reason(error)}")
        sort_apply_errors(report, driver)
        emit("health_checked", problems=len(report.problems), conflicts=len(conflicts),
             apply_errors=len(report.apply_errors), lag_bytes=lag.bytes, lag_high=report.lag_high)
        return report

    def _probe_problems(self) -> list[str]:
        """The probes run as their own read-only role only, never as the admin."""
        probes = self.request.health_probes
        if self.probe is None:
            refused = ["health_probes: no probe login (probe_conn_id) to run them as"] if probes else []
            return refused + health.probe_problems(self.endpoint(self.target()), self.admin, (),
                                                   self.request.probe_budget_ms)
        return health.probe_problems(self.endpoint(self.target()), self.probe, probes, self.request.probe_budget_ms)

    def compare_latency(self) -> latency.Comparison:
        """The probes and the source's top statements timed on both nodes (latency.py) as the read-only probe role,
        never as the admin; kept in last_latency."""
        if self.probe is None:
            raise ValueError("the latency comparison runs as the probe role: configure probe_conn_id")
        comparison = self.last_latency = latency.compare(
            self.endpoint(self.source), self.endpoint(self.target()), self.probe, self.request.health_probes,
            max_ratio=self.request.max_latency_ratio, floor_ms=self.request.latency_floor_ms,
            top_statements=self.request.latency_top_statements, timeout_ms=self.request.probe_budget_ms)
        emit("latency_compared", statements_from=comparison.statements_from, compared=len(comparison.compared),
             regressed=len(comparison.regressed), skipped=len(comparison.skipped),
             log_level=logging.WARNING if comparison.regressed else logging.INFO)
        return comparison

    def rollback(self, token: str) -> dict:
        if rds.describe_instance(self.rds_client, self.target_id) is None:
            controller = self.controller()  # no target yet: nothing can have moved but the routes
            controller.switch(0, "target")
            emit("rollback_done", after_cutover=False, target_exists=False)
            return {"after_cutover": False, "target_exists": False, "total_ms": 0.0, "split": controller.read_split(),
                    "writer": "source"}
        return Rollback(**self._switch_arguments(token)).run()

    def cutover(self, token: str, halted=lambda: None) -> dict:
        return Cutover(**self._switch_arguments(token), halted=halted).run()

    def recover_switch(self, token: str) -> dict:
        """Settle a cutover or rollback whose process died (the watchdog); LockBusy while its actor lives."""
        return Cutover(**self._switch_arguments(token)).recover()

    def _switch_arguments(self, token: str) -> dict:
        driver, target = self.driver(), self.target()
        source_endpoint = self.endpoint(self.source)
        with connected(source_endpoint, self.admin) as connection:
            roles = self.application_roles(connection)
            seqs = catalog.sequences(connection, self.request.filters)
        return {
            "driver": driver,
            "controller": self.controller(target),
            "source": source_endpoint,
            "target": self.endpoint(target),
            "admin": self.admin,
            "roles": roles,
            "sequences": seqs,
            "deadline_seconds": self.request.cutover_deadline_seconds,
            "token": token,
            "key": self.key,
        }

    def verify(self, progress=lambda figures: None) -> dict:
        """Every selected row equal on both nodes, compared while writes go on (see verify.py); after cutover, every
        sequence of the target at or past the source's. Before cutover the sequences are not compared: the cutover
        moves them. progress: called with the figures every few seconds."""
        with connected(self.endpoint(self.source), self.admin) as source:
            state = switch_state.read(source, self.key)
            tables = catalog.tables(source, self.request.filters)
            seqs = catalog.sequences(source, self.request.filters)
        if state is not None and not state.settled:
            raise verify.VerificationError(f"the switch is unsettled ({state.direction} {state.phase}): verify after it "
                                           "settles (the watchdog or a rollback settles it)")
        after_cutover = state is not None and state.writer == "target"
        target = self.endpoint(self.target())
        nodes = [verify.VerifyNode("source", self.endpoint(self.source), writer=not after_cutover),
                 verify.VerifyNode("target", target, writer=after_cutover or DRIVERS[self.request.replication_driver].active_active)]

        def report_progress(figures: dict) -> None:
            emit("verify_progress", **figures)
            progress(figures)

        report = verify.Verification(nodes, self.admin, tables, parallelism=self.request.verify_parallelism,
                                     progress=report_progress).run()
        behind = {}
        if after_cutover:
            with connected(self.endpoint(self.source), self.admin) as source, connected(target, self.admin) as on_target:
                behind = sequences.differences(source, on_target, seqs)
        if report.divergences or behind:
            raise verify_error(report, behind)
        for rows in report.unchecked:
            emit("verify_rows_unchecked", log_level=logging.WARNING, detail=rows.describe("changed in every check"))
        result = {**report.as_dict(), "sequences": len(seqs) if after_cutover else 0, "after_cutover": after_cutover}
        emit("verified", **{k: v for k, v in result.items() if k != "divergences"})
        return result

    def detach(self, halted=lambda: None) -> dict:
        if self.request.decommission != "delete":
            emit("detach_skipped", reason="decommission is 'keep': the old node stays attached for rollback")
            return {"skipped": True}
        if self._source_now() is None:  # checked now: from here on the old node cannot take writes back
            return {"detached": self.request.source_identifier, "already": True}
        with self.acting(halted) as source:
            state = switch_state.read(source, self.key)
            if state is None or state.writer != "target" or not (state.settled or state.direction == DETACH):
                raise RuntimeError("detach refused: the target is not the settled writer "
                                   f"(switch state {state.as_dict() if state else None})")
            # Recorded first: from here on a rollback refuses, since the old node stops receiving writes.
            switch_state.write(source, self.key, SwitchState(DETACH, "detaching", state.token))
            result = self.driver().detach()
            switch_state.write(source, self.key, SwitchState(DETACH, "done", state.token))
        emit("old_node_detached", source=self.request.source_identifier)
        return result

    def decommission(self, snapshot_id: str) -> dict | rds.Wait:
        if self.request.decommission != "delete":
            emit("decommission_skipped", reason="decommission is 'keep'", source=self.request.source_identifier)
            return {"skipped": True, "source": self.request.source_identifier}
        self._source_now()  # checked now, before it is deleted
        result = rds.decommission(self.rds_client, self.request.source_identifier, final_snapshot_id=snapshot_id)
        if not isinstance(result, rds.Wait):
            emit("source_decommissioned", source=self.request.source_identifier, snapshot=snapshot_id)
        return result


def verify_error(report: verify.Report, behind: dict) -> verify.VerificationError:
    parts = [d.describe() for d in report.divergences]
    parts += [f"sequence {name}: source {a}, target {b}" for name, (a, b) in behind.items()]
    return verify.VerificationError("verification failed: " + "; ".join(parts))


def sort_apply_errors(report: health.HealthReport, driver) -> None:
    """Apply errors go to an operator only when they were recorded while replication still works: nothing else is
    wrong, lag is within the threshold and a row written now reaches the other node (flow_problem). Otherwise they
    stay with what happens anyway: named among the problems (the phase fails) or among the lag's causes."""
    if not report.apply_errors:
        return
    named = [f"apply error: {line}" for line in report.apply_errors]
    if report.problems:
        report.problems += named
    elif report.lag_high:  # not judged yet: the baseline stays where it was
        report.lag_causes += named
        report.apply_error_marks = dict(driver.apply_error_baseline or {})
    else:
        stalled = driver.flow_problem()
        if stalled is None:
            return
        report.problems += [stalled, *named]
    report.apply_errors = []
