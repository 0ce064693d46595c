"""Triggers run in the triggerer: they only wait, measuring replication lag off the event loop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from airflow.sdk import Variable
from airflow.triggers.base import BaseTrigger, TriggerEvent

from pgactive_upgrade import switch_state
from pgactive_upgrade.airflow import connections, state
from pgactive_upgrade.db import Credentials, Endpoint, connected
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication import Link, Node, driver_for


class ReplicationLagTrigger(BaseTrigger):
    """Fires when the replication lag is under the threshold with the initial copy done; with fire_on_escalation,
    also when it stayed above for escalate_after_seconds (`escalated`: an operator decides), else that is only logged.

    Carries no secrets: credentials are read from the named connection inside the triggerer.
    """

    def __init__(
        self,
        *,
        driver: str,
        source: dict[str, Any],
        target: dict[str, Any],
        db_conn_id: str,
        replication_user: str,
        threshold_bytes: int,
        escalate_after_seconds: int,
        halt_key: str,
        run_id: str,
        poll_interval: float = 5.0,
        source_identifier: str | None = None,
        fire_on_escalation: bool = False,
    ):
        """source_identifier: whose progress record gets each measurement (the page's lag chart)."""
        super().__init__()
        self.fire_on_escalation = fire_on_escalation
        self.driver = driver
        self.source = source
        self.target = target
        self.db_conn_id = db_conn_id
        self.replication_user = replication_user
        self.threshold_bytes = threshold_bytes
        self.escalate_after_seconds = escalate_after_seconds
        self.halt_key = halt_key
        self.run_id = run_id
        self.poll_interval = poll_interval
        self.source_identifier = source_identifier

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "source_identifier": self.source_identifier,
                "driver": self.driver,
                "source": self.source,
                "target": self.target,
                "db_conn_id": self.db_conn_id,
                "replication_user": self.replication_user,
                "threshold_bytes": self.threshold_bytes,
                "escalate_after_seconds": self.escalate_after_seconds,
                "halt_key": self.halt_key,
                "run_id": self.run_id,
                "poll_interval": self.poll_interval,
                "fire_on_escalation": self.fire_on_escalation,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        driver = driver_for(self.driver, self._link(await admin_login(self.db_conn_id)))
        started, escalated, polls = time.monotonic(), False, 0
        while True:
            polls += 1
            halt = await self._halt()
            if halt:
                yield TriggerEvent({"status": "halted", "halt": halt, "polls": polls})
                return
            try:
                lag = await asyncio.to_thread(driver.lag)
            except Exception as error:  # a transient connection failure must not end a 24 h wait
                self.log.warning("lag measurement failed: %s", type(error).__name__)
                await asyncio.sleep(self.poll_interval)
                continue
            await self._record(lag.bytes)
            if lag.within(self.threshold_bytes):
                yield TriggerEvent({"status": "synced", "lag_bytes": lag.bytes, "polls": polls, "detail": lag.detail})
                return
            waited = time.monotonic() - started
            if not escalated and waited > self.escalate_after_seconds:
                escalated = True
                emit("lag_escalation", lag_bytes=lag.bytes, waited_s=round(waited), detail=lag.detail)
                if self.fire_on_escalation:
                    yield TriggerEvent({"status": "escalated", "lag_bytes": lag.bytes, "waited_s": round(waited),
                                        "polls": polls})
                    return
            self.log.info("lag %s bytes, synced=%s, %.200s", lag.bytes, lag.synced, lag.detail)
            await asyncio.sleep(self.poll_interval)

    async def _halt(self) -> dict | None:
        return await read_halt(self.halt_key, self.run_id)

    async def _record(self, lag_bytes: int | None) -> None:
        if not self.source_identifier:
            return
        try:
            await sync_to_async(state.record_lag)(self.source_identifier, self.run_id, lag_bytes)
        except Exception as error:  # the record is for the page: a failed write must not end the wait
            self.log.warning("lag not recorded: %s", type(error).__name__)

    def _link(self, admin: Credentials) -> Link:
        return Link(
            source=_node(self.source),
            target=_node(self.target),
            admin=admin,
            replication=Credentials(self.replication_user, ""),
            tables=(),
        )


def _node(spec: dict[str, Any]) -> Node:
    endpoint = Endpoint.from_dict(spec)
    return Node(spec["identifier"], endpoint, endpoint)


async def admin_login(conn_id: str) -> Credentials:
    """The admin's login through the Postgres hook, with the deployment's TLS, read inside the triggerer."""
    def login() -> Credentials:
        return connections.credentials(conn_id, connections.deployment())[0]

    return await sync_to_async(login)()


async def read_halt(halt_key: str, run_id: str) -> dict | None:
    """The rollback's halt record when it names this run."""
    raw = await sync_to_async(Variable.get)(halt_key, default=None)
    halt = json.loads(raw) if raw else None
    return halt if halt and halt.get("run_id") == run_id else None


def previous_phase_outcome(get_ti_count, *, dag_id: str, run_id: str, check_task_id: str, index: int) -> str | None:
    """'success' or the state that stopped phase index's health check; None while it has not ended."""
    for wanted in ("success", "failed", "upstream_failed", "skipped"):
        if get_ti_count(dag_id=dag_id, task_ids=[check_task_id], map_index=index, run_ids=[run_id], states=[wanted]):
            return wanted
    return None


class PhaseGateTrigger(BaseTrigger):
    """Waits in the triggerer until the previous phase's health check ended (or a rollback halted the run)."""

    def __init__(self, *, dag_id: str, run_id: str, check_task_id: str, previous_index: int, halt_key: str,
                 poll_interval: float = 1.0):
        super().__init__()
        self.dag_id = dag_id
        self.run_id = run_id
        self.check_task_id = check_task_id
        self.previous_index = previous_index
        self.halt_key = halt_key
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "dag_id": self.dag_id,
                "run_id": self.run_id,
                "check_task_id": self.check_task_id,
                "previous_index": self.previous_index,
                "halt_key": self.halt_key,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        while True:
            halt = await read_halt(self.halt_key, self.run_id)
            if halt:
                yield TriggerEvent({"status": "halted", "halt": halt})
                return
            outcome = await sync_to_async(previous_phase_outcome)(
                RuntimeTaskInstance.get_ti_count, dag_id=self.dag_id, run_id=self.run_id,
                check_task_id=self.check_task_id, index=self.previous_index,
            )
            if outcome:
                yield TriggerEvent({"status": outcome})
                return
            await asyncio.sleep(self.poll_interval)


class SwitchWatchdogTrigger(BaseTrigger):
    """Watches a cutover from the triggerer. Fires `abandoned` when the switch state on the source is unsettled
    while nobody holds the upgrade's lock (the server freed it when the acting process died), `finished` once the
    cutover task ended with nothing left to settle, or `halted` when a rollback took the upgrade over."""

    def __init__(self, *, source: dict[str, Any], db_conn_id: str, key: str, dag_id: str, run_id: str,
                 cutover_task_id: str, halt_key: str, poll_interval: float = 1.0):
        super().__init__()
        self.source = source
        self.db_conn_id = db_conn_id
        self.key = key
        self.dag_id = dag_id
        self.run_id = run_id
        self.cutover_task_id = cutover_task_id
        self.halt_key = halt_key
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "source": self.source,
                "db_conn_id": self.db_conn_id,
                "key": self.key,
                "dag_id": self.dag_id,
                "run_id": self.run_id,
                "cutover_task_id": self.cutover_task_id,
                "halt_key": self.halt_key,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        admin = await admin_login(self.db_conn_id)
        while True:
            try:
                verdict = await asyncio.to_thread(switch_verdict, _node(self.source).endpoint, admin, self.key)
            except Exception as error:  # the source unreachable for a moment must not end the watch
                self.log.warning("switch state unreadable: %s", type(error).__name__)
                verdict = None
            if verdict == "abandoned":
                yield TriggerEvent({"status": "abandoned"})
                return
            if verdict is not None and verdict != "acting":
                if await read_halt(self.halt_key, self.run_id):
                    yield TriggerEvent({"status": "halted"})
                    return
                ended = await sync_to_async(RuntimeTaskInstance.get_ti_count)(
                    dag_id=self.dag_id, task_ids=[self.cutover_task_id], run_ids=[self.run_id],
                    states=["success", "failed", "upstream_failed", "skipped"],
                )
                if ended:
                    yield TriggerEvent({"status": "finished", "switch": verdict})
                    return
            await asyncio.sleep(self.poll_interval)


def switch_verdict(endpoint: Endpoint, admin: Credentials, key: str) -> str:
    """'none' (no switch yet), 'settled', 'acting' (a live process holds the lock) or 'abandoned'."""
    with connected(endpoint, admin, connect_timeout=5, statement_timeout_ms=5000) as connection:
        state = switch_state.read(connection, key)
        if state is None:
            return "none"
        if state.settled or state.direction == switch_state.DETACH:
            return "settled"
        return "acting" if switch_state.lock_holder(connection, key) else "abandoned"


class SettleTrigger(BaseTrigger):
    """A phase's settle time, waited in the triggerer; ends early, `halted`, when a rollback halted the run."""

    def __init__(self, *, seconds: float, halt_key: str, run_id: str, poll_interval: float = 1.0):
        super().__init__()
        self.seconds, self.halt_key, self.run_id, self.poll_interval = seconds, halt_key, run_id, poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"seconds": self.seconds, "halt_key": self.halt_key, "run_id": self.run_id,
                 "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = time.monotonic() + self.seconds
        while (remaining := deadline - time.monotonic()) > 0:
            halt = await read_halt(self.halt_key, self.run_id)
            if halt:
                yield TriggerEvent({"status": "halted", "halt": halt})
                return
            await asyncio.sleep(min(self.poll_interval, remaining))
        yield TriggerEvent({"status": "settled"})


class JoinTrigger(BaseTrigger):
    """Waits in the triggerer while the target joins the replication group (pgactive copies the whole database):
    `ready`, or `failed` when the joining node is listed without its worker for `stalled_polls` polls in a row."""

    def __init__(self, *, driver: str, source: dict[str, Any], target: dict[str, Any], db_conn_id: str,
                 poll_interval: float = 5.0, stalled_polls: int = 3):
        super().__init__()
        self.driver, self.source, self.target, self.db_conn_id = driver, source, target, db_conn_id
        self.poll_interval, self.stalled_polls = poll_interval, stalled_polls

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"driver": self.driver, "source": self.source, "target": self.target, "db_conn_id": self.db_conn_id,
                 "poll_interval": self.poll_interval, "stalled_polls": self.stalled_polls})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        admin = await admin_login(self.db_conn_id)
        link = Link(source=_node(self.source), target=_node(self.target), admin=admin,
                    replication=Credentials("", ""), tables=())
        driver = driver_for(self.driver, link)
        stalled = 0
        while True:
            try:
                progress_now = await asyncio.to_thread(driver.join_progress)
            except Exception as error:  # a transient connection failure must not end the wait
                self.log.warning("join progress unknown: %s", type(error).__name__)
                progress_now = "joining"
            # While pgactive restores the copy the node is not listed at all: only a listed node without its worker
            # means the join died (the task's timeout bounds the rest).
            stalled = stalled + 1 if progress_now == "stalled" else 0
            if progress_now == "ready":
                yield TriggerEvent({"status": "ready"})
                return
            if stalled >= self.stalled_polls:
                yield TriggerEvent({"status": "failed",
                                    "message": f"the joining node was {progress_now} for {stalled} polls"})
                return
            await asyncio.sleep(self.poll_interval)
