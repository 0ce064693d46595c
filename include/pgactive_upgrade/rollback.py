"""Rollback: every route back to the source, replication kept running.

Before cutover (or with an active-active driver) writes never left the source, or are already on it:
moving the routes is enough. After a one-way cutover, the target holds the latest writes: the reverse
of a cutover (fence the target, wait for its marker on the source, sequences, switch, unfence the source),
with the reverse replication left running so nothing written on the target is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pgactive_upgrade import fencing, sequences, switch_state
from pgactive_upgrade.cutover import FencedSwitch, ms_since
from pgactive_upgrade.switch_state import DETACH, ROLLBACK, SWITCHING, SwitchState
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


@dataclass
class Rollback(FencedSwitch):
    """Every route back to the source, replication kept running.

    Before cutover (or with an active-active driver) writes never left the source, or are already on it: moving
    the routes is enough, and the target is not even contacted. After a one-way cutover the target holds the
    latest writes: the reverse of a cutover, with the reverse replication left running so nothing is lost.
    """

    def run(self) -> dict:
        started = time.monotonic()
        with self._session() as source:
            state = self.settle(source)
            if state and state.direction == DETACH:
                raise RollbackError(
                    f"the old node was detached from replication ({state.phase} at {state.updated_at}); it no longer "
                    "receives writes, and returning traffic to it would lose them"
                )
            after = state is not None and state.writer == "target" and not self.driver.active_active
            result = self._after_cutover(source) if after else self._before_cutover(source, state)
        result.update(total_ms=ms_since(started), steps_ms=self.timings_ms, split=self.controller.read_split(),
                      writer="source")
        emit("rollback_done", after_cutover=after, total_ms=result["total_ms"])
        return result

    def _before_cutover(self, source, state: SwitchState | None) -> dict:
        self._step("source_unfenced", fencing.unfence, source)
        self._step("switched", self.controller.switch, 0, "target")
        if state is not None and state.writer == "target":  # active-active after cutover: the source writes again
            switch_state.write(source, self.key, SwitchState(ROLLBACK, "done", self.token))
        return {"after_cutover": False}

    def _after_cutover(self, source) -> dict:
        previous = self.controller.read_split()
        with self._connect(self.target) as target:
            fencing.ensure_record_table(target)
            state = SwitchState(ROLLBACK, "fencing", self.token, previous)
            started = time.monotonic()
            try:
                self._advance(source, state, "fencing")
                self._step("target_fenced", fencing.fence, target, self.target.dbname, self.roles)
                self._advance(source, state, "fenced")
                self._step("marker_written", self.driver.write_marker, target, self.token)
                self._step("caught_up", self._wait_for_marker, source, started, "the source")
                self._advance(source, state, "caught_up")
                moved = self._step("sequences", sequences.move_forward, target, source, self.sequences)
                self._advance(source, state, "sequences")
                self._check_deadline(started, "before the traffic switch")
                self._advance(source, state, SWITCHING, mirror=target)
            except BaseException as error:  # a task timeout or termination too
                self._undo_rollback(source, state, target)
                if not isinstance(error, Exception):
                    raise
                raise RollbackError(
                    f"rollback after cutover failed (steps done: {list(self.timings_ms)}): {error}; the target was "
                    "unfenced again and still takes the writes (the only writable node)"
                ) from error
            try:
                self._forward_rollback(source, state, target)
            except Exception as error:
                raise RollbackError(
                    f"the rollback's switch was sent, so it goes forward, but it did not finish: {error}. The target "
                    "stays fenced; running the rollback again finishes it"
                ) from error
            unavailable_ms = ms_since(started)
            self._step("target_sessions_ended", fencing.end_sessions, target, self.target.dbname, self.roles)
        return {"after_cutover": True, "write_unavailable_ms": unavailable_ms, "sequences_moved": len(moved)}


