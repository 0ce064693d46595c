"""Triggers run in the triggerer: they only wait, measuring replication lag off the event loop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from asgiref.sync import sync_to_async
from airflow.sdk import BaseHook, Variable
from airflow.triggers.base import BaseTrigger, TriggerEvent

from pgactive_upgrade.db import Credentials, Endpoint
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication import Link, Node, driver_for


class ReplicationLagTrigger(BaseTrigger):
    """Fires when the replication lag is under the threshold with the initial copy done.

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
    ):
        super().__init__()
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

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
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
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        connection = await sync_to_async(BaseHook.get_connection)(self.db_conn_id)
        driver = driver_for(self.driver, self._link(Credentials(connection.login, connection.password)))
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
            if lag.within(self.threshold_bytes):
                yield TriggerEvent({"status": "synced", "lag_bytes": lag.bytes, "polls": polls, "detail": lag.detail})
                return
            waited = time.monotonic() - started
            if not escalated and waited > self.escalate_after_seconds:
                escalated = True
                emit("lag_escalation", lag_bytes=lag.bytes, waited_s=round(waited), detail=lag.detail)
            self.log.info("lag %s bytes, synced=%s, %s", lag.bytes, lag.synced, lag.detail)
            await asyncio.sleep(self.poll_interval)

    async def _halt(self) -> dict | None:
        raw = await sync_to_async(Variable.get)(self.halt_key, default=None)
        halt = json.loads(raw) if raw else None
        return halt if halt and halt.get("run_id") == self.run_id else None

    def _link(self, admin: Credentials) -> Link:
        return Link(
            source=_node(self.source),
            target=_node(self.target),
            admin=admin,
            replication=Credentials(self.replication_user, ""),
            tables=(),
        )


def _node(spec: dict[str, Any]) -> Node:
    endpoint = Endpoint(spec["host"], int(spec["port"]), spec["dbname"])
    return Node(spec["identifier"], endpoint, endpoint)
