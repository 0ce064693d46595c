"""The fenced traffic switch, as a resumable state machine: the cutover, and its reverse (a rollback after cutover).

Each run holds the upgrade's lock on the source and records its phase there (see switch_state) before each act
that cannot be taken back. Whoever takes the lock next finds a switch left unsettled by a dead actor and settles
it: undone before `switching` was recorded, rolled forward after. The node that stops taking writes is fenced
for real (fencing.fence) before the other one is opened, so exactly one node takes application writes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

from pgactive_upgrade import fencing, sequences, switch_state, tracing
from pgactive_upgrade.catalog import Sequence
from pgactive_upgrade.db import Credentials, Endpoint, connected
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication.base import ReplicationDriver
from pgactive_upgrade.switch_state import CUTOVER, DETACH, ROLLBACK, SWITCHING, UNDONE, SwitchState
from pgactive_upgrade.traffic.base import TrafficController


class CutoverError(RuntimeError):
    pass


@dataclass
class FencedSwitch:
    """What a cutover and a rollback share: who, where, timed steps, and how to settle an unfinished switch."""

    driver: ReplicationDriver
    controller: TrafficController
    source: Endpoint
    target: Endpoint
    admin: Credentials = field(repr=False)
    roles: list[str]
    sequences: list[Sequence]
    deadline_seconds: float
    token: str
    key: str
    halted: Callable[[], None] = lambda: None  # raises when a rollback asked the upgrade to stop
    poll_seconds: float = 0.001
    timings_ms: dict = field(default_factory=dict)
    switched_at: float = 0.0

    # --- connections and the lock ----------------------------------------------------------------
    def _connect(self, endpoint: Endpoint):
        # Every statement inside a fence ends in bounded time, and a dead peer is noticed (db.KEEPALIVES).
        return connected(endpoint, self.admin, connect_timeout=5,
                         statement_timeout_ms=int(max(self.deadline_seconds, 10) * 1000))

    @property
    def lock_wait_seconds(self) -> float:
        """A live holder finishes or undoes its switch within its deadline; a dead one frees the lock at once."""
        return self.deadline_seconds + 30

    @contextmanager
    def _session(self, wait_seconds: float | None = None) -> Iterator:
        with self._connect(self.source) as source:
            switch_state.ensure_table(source)
            fencing.ensure_record_table(source)
            with switch_state.locked(source, self.key, self.lock_wait_seconds if wait_seconds is None else wait_seconds):
                yield source

    @contextmanager
    def _target_session(self, target=None) -> Iterator:
        if target is not None:
            yield target
            return
        with self._connect(self.target) as connection:
            yield connection

    # --- recording ------------------------------------------------------------------------------
    def _step(self, name: str, function, *args):
        began = time.monotonic()
        with tracing.span(f"{type(self).__name__.lower()}.{name}", token=self.token):
            result = function(*args)
        self.timings_ms[name] = ms_since(began)
        return result

    def _advance(self, source, state: SwitchState, phase: str, mirror=None, durable: bool = True) -> None:
        state.phase = phase
        switch_state.write(source, self.key, state, durable)
        if mirror is not None:
            switch_state.write(mirror, self.key, state)
        emit("switch_phase", direction=state.direction, phase=phase, token=self.token)

    def _mirror_when_reachable(self, state: SwitchState) -> None:
        try:
            with self._target_session() as target:
                switch_state.ensure_table(target)
                switch_state.write(target, self.key, state)
        except Exception as error:  # the source holds the authoritative row
            emit("switch_state_not_mirrored", phase=state.phase, error=type(error).__name__)

    def _wait_for_marker(self, connection, started: float, where: str) -> None:
        """Until the marker written on the fenced side is visible through `connection`."""
        while not self.driver.has_marker(connection, self.token):
            if time.monotonic() - started > self.deadline_seconds:
                raise TimeoutError(f"deadline of {self.deadline_seconds} s passed while waiting for {where} to catch up")
            time.sleep(self.poll_seconds)

    def _check_deadline(self, started: float, where: str) -> None:
        if time.monotonic() - started > self.deadline_seconds:
            raise TimeoutError(f"deadline of {self.deadline_seconds} s passed {where}")

    # --- settling what a dead actor left ----------------------------------------------------------
    def settle(self, source) -> SwitchState | None:
        """Under the lock: finish an unsettled switch in the safe direction; returns the state after."""
        state = switch_state.read(source, self.key)
        if state is None or state.settled or state.direction == DETACH:
            return state
        forward = state.past_no_return
        emit("switch_resumed", direction=state.direction, phase=state.phase, token=state.token, holder=state.holder,
             forward=forward)
        state.holder = switch_state.holder_name()
        if state.direction == CUTOVER:
            (self._forward_cutover if forward else self._undo_cutover)(source, state)
        else:
            (self._forward_rollback if forward else self._undo_rollback)(source, state)
        return switch_state.read(source, self.key)

    def recover(self, wait_seconds: float = 5.0) -> dict:
        """Settle a switch whose actor died (the watchdog's and the rollback's first act); LockBusy when alive."""
        with self._session(wait_seconds) as source:
            before = switch_state.read(source, self.key)
            after = self.settle(source)
        return {"before": before.as_dict() if before else None, "after": after.as_dict() if after else None,
                "steps_ms": self.timings_ms}

    # --- the cutover's two ways out ----------------------------------------------------------------
    def _forward_cutover(self, source, state: SwitchState, target=None) -> None:
        with self._target_session(target) as target:
            # Before the switch: a session opened on a read-only database keeps its read-only default.
            self._step("target_unfenced", fencing.reset_read_only, target, self.target.dbname, self.roles)
            self._step("switched", self.controller.switch, 100, "source")
            self.switched_at = time.monotonic()
            self._advance(source, state, "switched")
            self._step("reverse_started", self.driver.after_switch)
            self._advance(source, state, "done", mirror=target)

    def _undo_cutover(self, source, state: SwitchState, target=None) -> None:
        """Every undo action runs even when an earlier one fails; the state says `undone` only when all did."""
        switch_state.confirm(source, self.key, state)
        failed = []
        for name, action in (
            ("restore split", lambda: restore_split(self.controller, state.previous_split)),
            ("unfence source", lambda: fencing.unfence(source)),
        ):
            try:
                action()
            except Exception as error:
                failed.append(f"{name}: {error}")
        try:
            self.driver.abort_cutover()  # the next cutover replaces a leftover reverse slot anyway
        except Exception as error:
            emit("reverse_capture_not_dropped", error=f"{type(error).__name__}: {str(error)[:200]}")
        emit("cutover_undone", split=state.previous_split, undo_failures=failed)
        if failed:
            raise CutoverError("the cutover's undo did not complete (the next cutover, the watchdog or the rollback "
                               "finishes it): " + "; ".join(failed))
        self._advance(source, state, UNDONE)
        self._mirror_when_reachable(state)

    # --- the rollback's two ways out ----------------------------------------------------------------
    def _forward_rollback(self, source, state: SwitchState, target=None) -> None:
        self._step("source_unfenced", fencing.unfence, source)
        self._step("switched", self.controller.switch, 0, "target")
        self._advance(source, state, "done", mirror=target)
        if target is None:
            self._mirror_when_reachable(state)

    def _undo_rollback(self, source, state: SwitchState, target=None) -> None:
        switch_state.confirm(source, self.key, state)
        with self._target_session(target) as target:
            fencing.unfence(target)
            restore_split(self.controller, state.previous_split)
            self._advance(source, state, UNDONE, mirror=target)


def ms_since(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)


@dataclass
class Cutover(FencedSwitch):
    def run(self) -> dict:
        with self._session() as source:
            state = self.settle(source)
            if state and state.writer == "target":
                return self._already_done(state)
            if state and state.direction == ROLLBACK:
                raise CutoverError(
                    "this upgrade was rolled back after cutover (the source takes the writes again); cutting over "
                    "again needs a new upgrade from a fresh target"
                )
            self.halted()
            return self._cut_over(source)

    def _cut_over(self, source) -> dict:
        previous = self.controller.read_split()
        self._step("before_fence", self.driver.before_fence)
        with self._connect(self.target) as target, self._connect(self.target) as target_for_reverse:
            switch_state.ensure_table(target)
            # Roles that logged in to the target since the build (or were added) get its read-only default too.
            missing = sorted(set(self.roles) - set(fencing.read_only_roles(target, self.target.dbname)))
            if missing and not self.driver.active_active:
                fencing.set_read_only(target, self.target.dbname, missing)
            state = SwitchState(CUTOVER, "fencing", self.token, previous)
            started = time.monotonic()
            try:
                self._advance(source, state, "fencing")  # durable: it holds the split and the fence to undo
                ended = self._step("fence", fencing.fence, source, self.source.dbname, self.roles)
                # Inside the fence, each phase up to `switching` is undone the same way as `fencing`: no WAL flush.
                self._advance(source, state, "fenced", durable=False)
                self._step("marker_written", self.driver.write_marker, source, self.token)
                self._step("caught_up", self._wait_for_marker, target, started, "the target")
                self._advance(source, state, "caught_up", durable=False)
                moved = self._sequences_and_reverse(source, target, target_for_reverse)
                self._advance(source, state, "reverse_prepared", durable=False)
                self._check_deadline(started, "before the traffic switch")
                self._advance(source, state, SWITCHING, mirror=target)
            except BaseException as error:  # a task timeout or termination too: nothing half-done stays
                self._undo_cutover(source, state, target)
                if not isinstance(error, Exception):
                    raise
                raise CutoverError(
                    f"cutover failed after {ms_since(started)} ms (steps done: {list(self.timings_ms)}): "
                    f"{error}; source unfenced and split restored to {previous}"
                ) from error
            try:
                self._forward_cutover(source, state, target)
            except Exception as error:
                raise CutoverError(
                    f"the switch was sent, so the cutover goes forward, but it did not finish: {error}. The source stays "
                    "fenced; clearing this task (or the watchdog, or the rollback DAG) finishes it"
                ) from error
            unavailable_ms = round((self.switched_at - started) * 1000, 1)  # writes go to the target from here
            total_ms = ms_since(started)
        split = self.controller.read_split()
        if any(percent != 100 for percent in split.values()):
            raise CutoverError(f"traffic switched but the split reads back as {split}; set it to 100 % by hand")
        result = {
            "write_unavailable_ms": unavailable_ms,
            "total_ms": total_ms,
            "sessions_ended": ended,
            "sequences_moved": len(moved),
            "roles_fenced": self.roles,
            "split": split,
            "steps_ms": self.timings_ms,
        }
        emit("cutover_done", write_unavailable_ms=unavailable_ms, sequences_moved=len(moved), sessions_ended=ended)
        return result

    def _sequences_and_reverse(self, source, target, target_for_reverse) -> dict:
        """Both need only the marker to have arrived and touch different objects: side by side, inside the fence.
        Leaving the pool waits for the reverse capture, so an undo never races its creation."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            reverse = pool.submit(self._step, "reverse_prepared", self.driver.prepare_reverse, target_for_reverse)
            moved = self._step("sequences", sequences.move_forward, source, target, self.sequences)
            reverse.result()
        return moved

    def _already_done(self, state: SwitchState) -> dict:
        if state.direction != DETACH:
            with self._connect(self.target) as target:
                fencing.reset_read_only(target, self.target.dbname, self.roles)
            self.controller.set_target_percent(100)
        emit("cutover_already_done", direction=state.direction, phase=state.phase)
        return {"already_done": True, "state": state.as_dict(), "split": self.controller.read_split()}


def restore_split(controller: TrafficController, split: dict[str, int]) -> None:
    by_percent: dict[int, list[str]] = {}
    for route, percent in split.items():
        by_percent.setdefault(percent, []).append(route)
    for percent, routes in by_percent.items():
        controller.set_target_percent(percent, routes)
