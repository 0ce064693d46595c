"""Rollback: every route back to the source, replication kept running.

Before cutover (or with an active-active driver) writes never left the source, or are already on it:
moving the routes is enough. After a one-way cutover, the target holds the latest writes: the reverse
of a cutover (fence the target, wait for its marker on the source, sequences, switch, unfence the source),
with the reverse replication left running so nothing written on the target is lost.
"""

from __future__ import annotations

import time
from pgactive_upgrade import fencing, sequences
from pgactive_upgrade.cutover import FencedSwitch, ms_since
from pgactive_upgrade.db import connected
from pgactive_upgrade.events import emit
from pgactive_upgrade.traffic import HAProxyController
from pgactive_upgrade.traffic.base import routes_from_settings


class RollbackError(RuntimeError):
    pass


def early_switch_to_source(traffic: dict) -> bool:
    """Before cutover the source has every write: with HAProxy, traffic can go back at once, before the
    rollback waits for the halted upgrade's steps (the full rollback switches again afterwards)."""
    settings = traffic.get("haproxy") or {}
    if traffic.get("controller") != "haproxy" or settings.get("set_target_address"):
        return False
    HAProxyController(
        runtime_api=settings["runtime_api"],
        routes=routes_from_settings(settings["routes"]),
        source_server=settings.get("source_server", "source"),
        target_server=settings.get("target_server", "target"),
    ).switch(0, "target")
    emit("rollback_early_switch", routes=[route["name"] for route in settings["routes"]])
    return True


class Rollback(FencedSwitch):
    def run(self) -> dict:
        started = time.monotonic()
        reverse = not self.driver.active_active and self.driver.cut_over_already()
        result = self._after_cutover() if reverse else self._before_cutover()
        result.update(total_ms=ms_since(started), steps_ms=self.timings_ms, split=self.controller.read_split())
        emit("rollback_done", after_cutover=reverse, total_ms=result["total_ms"])
        return result

    def _before_cutover(self) -> dict:
        with connected(self.source, self.admin) as source:  # an interrupted cutover may have left it fenced
            self._step("source_unfenced", fencing.unfence, source, self.source.dbname, self.roles)
        self._step("switched", self._switch_to_source)
        return {"after_cutover": False}

    def _after_cutover(self) -> dict:
        started = time.monotonic()
        with connected(self.source, self.admin) as source, connected(self.target, self.admin) as target:
            fenced_at = time.monotonic()
            try:
                self._step("target_fenced", fencing.fence, target, self.target.dbname, self.roles)
                self._step("marker_written", self.driver.write_marker, target, self.token)
                self._step("caught_up", self._wait_for_marker, source, started, "the source")
                moved = self._step("sequences", sequences.move_forward, target, source, self.sequences)
                self._step("source_unfenced", fencing.unfence, source, self.source.dbname, self.roles)
                self._step("switched", self._switch_to_source)
            except Exception as error:
                fencing.unfence(target, self.target.dbname, self.roles)
                raise RollbackError(
                    f"rollback after cutover failed (steps done: {list(self.timings_ms)}): {error}; "
                    "the target was unfenced again and still takes the writes"
                ) from error
            unavailable_ms = ms_since(fenced_at)
            self._step("target_sessions_ended", fencing.end_sessions, target, self.target.dbname, self.roles)
        return {"after_cutover": True, "write_unavailable_ms": unavailable_ms, "sequences_moved": len(moved)}

    def _switch_to_source(self) -> None:
        self.controller.switch(0, "target")

