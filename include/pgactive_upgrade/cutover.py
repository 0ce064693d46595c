"""Cutover in one step with a hard deadline: fence, catch up, sequences, switch, unfence.

Any failure before the switch undoes the fence and restores the previous split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from pgactive_upgrade import fencing, sequences
from pgactive_upgrade.catalog import Sequence
from pgactive_upgrade.db import Credentials, Endpoint, connected
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication.base import ReplicationDriver
from pgactive_upgrade.traffic.base import TrafficController


class CutoverError(RuntimeError):
    pass


@dataclass
class FencedSwitch:
    """What a cutover and its reverse, the rollback after cutover, share: who, where, and timed steps."""

    driver: ReplicationDriver
    controller: TrafficController
    source: Endpoint
    target: Endpoint
    admin: Credentials = field(repr=False)
    roles: list[str]
    sequences: list[Sequence]
    deadline_seconds: float
    token: str
    poll_seconds: float = 0.001
    timings_ms: dict = field(default_factory=dict)

    def _step(self, name: str, function, *args):
        began = time.monotonic()
        result = function(*args)
        self.timings_ms[name] = ms_since(began)
        return result

    def _wait_for_marker(self, connection, started: float, where: str) -> None:
        """Until the marker written on the fenced side is visible through `connection`."""
        while not self.driver.has_marker(connection, self.token):
            if time.monotonic() - started > self.deadline_seconds:
                raise CutoverError(f"deadline of {self.deadline_seconds} s passed while waiting for {where} to catch up")
            time.sleep(self.poll_seconds)


def ms_since(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)


@dataclass
class Cutover(FencedSwitch):
    halted: Callable[[], None] = lambda: None  # raises when a rollback asked the upgrade to stop

    def run(self) -> dict:
        self.halted()
        if self.driver.cut_over_already():
            return self._finish_already_done()
        previous = self.controller.read_split()
        self._step("before_fence", self.driver.before_fence)
        started = time.monotonic()
        with connected(self.source, self.admin) as source, connected(self.target, self.admin) as target:
            fenced_at = time.monotonic()
            try:
                ended = self._step("fence", fencing.fence, source, self.source.dbname, self.roles)
                self._step("marker_written", self.driver.write_marker, source, self.token)
                self._step("caught_up", self._wait_for_marker, target, started, "the target")
                moved = self._step("sequences", sequences.move_forward, source, target, self.sequences)
                self._step("reverse_prepared", self.driver.prepare_reverse, target)
                # Before the switch: a session opened on a fenced database keeps its read-only default.
                self._step("target_unfenced", fencing.unfence, target, self.target.dbname, self.roles)
                self._check_deadline(started, "before the traffic switch")
                self._step("switched", self.controller.switch, 100, "source")
            except Exception as error:
                self._undo(source, target, previous)
                raise CutoverError(
                    f"cutover failed after {ms_since(started)} ms (steps done: {list(self.timings_ms)}): "
                    f"{error}; source unfenced and split restored to {previous}"
                ) from error
            unavailable_ms = ms_since(fenced_at)
            # Sessions that reconnected to the source inside the fence are read-only: end them too.
            ended += self._step("source_sessions_ended", fencing.end_sessions, source, self.source.dbname, self.roles)
        reverse = self._step("reverse_started", self.driver.after_switch)
        split = self.controller.read_split()
        if any(percent != 100 for percent in split.values()):
            raise CutoverError(f"traffic switched but the split reads back as {split}; set it to 100 % by hand")
        result = {
            "write_unavailable_ms": unavailable_ms,
            "total_ms": ms_since(started),
            "sessions_ended": ended,
            "sequences_moved": len(moved),
            "roles_fenced": self.roles,
            "split": split,
            "steps_ms": self.timings_ms,
            "replication": reverse,
        }
        emit("cutover_done", write_unavailable_ms=unavailable_ms, sequences_moved=len(moved), sessions_ended=ended)
        return result

    def _check_deadline(self, started: float, where: str) -> None:
        if time.monotonic() - started > self.deadline_seconds:
            raise CutoverError(f"deadline of {self.deadline_seconds} s passed {where}")

    def _undo(self, source, target, previous: dict[str, int]) -> None:
        """Every undo action runs even when an earlier one fails; failures are reported together."""
        actions = [
            ("restore split", lambda: restore_split(self.controller, previous)),
            ("unfence source", lambda: fencing.unfence(source, self.source.dbname, self.roles)),
            ("drop reverse capture", self.driver.abort_cutover),
        ]
        if not self.driver.active_active:
            actions.append(("fence target again", lambda: fencing.fence(target, self.target.dbname, self.roles)))
        failed = []
        for name, action in actions:
            try:
                action()
            except Exception as error:
                failed.append(f"{name}: {error}")
        emit("cutover_undone", split=previous, undo_failures=failed)
        if failed:
            raise CutoverError("cutover failed and its undo did not complete: " + "; ".join(failed))

    def _finish_already_done(self) -> dict:
        with connected(self.source, self.admin) as source:
            if not fencing.fenced_roles(source, self.source.dbname):
                raise CutoverError(
                    "replication was reversed by an earlier cutover, but the source takes writes again: the upgrade was "
                    "rolled back after cutover. Cutting over again needs a new upgrade from a fresh target."
                )
        replication = self.driver.after_switch()  # completes a cutover that stopped right after its switch
        with connected(self.target, self.admin) as target:
            fencing.unfence(target, self.target.dbname, self.roles)
        self.controller.set_target_percent(100)
        emit("cutover_already_done")
        return {"already_done": True, "split": self.controller.read_split(), "replication": replication}


def restore_split(controller: TrafficController, split: dict[str, int]) -> None:
    by_percent: dict[int, list[str]] = {}
    for route, percent in split.items():
        by_percent.setdefault(percent, []).append(route)
    for percent, routes in by_percent.items():
        controller.set_target_percent(percent, routes)
