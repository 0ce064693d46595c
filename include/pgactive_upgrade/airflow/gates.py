"""Human gates: Airflow's human-in-the-loop operator (standard provider) asking an operator, from the UI's Required
Actions or the REST API (`PATCH .../taskInstances/{task}/{map_index}/hitlDetails`), whether the upgrade goes on.

Each gate asks only when its situation arises (an approval the conf asks for, lag that stayed high after a phase,
new conflicts or apply errors); otherwise it succeeds at once, or, for an approval, the verification before it skips
it. It never waits forever: after `gate_timeout_minutes` Airflow applies `gate_timeout_answer` (Stop or Roll back,
never a way forward). Every answer (who, when, what, or the timeout) goes
into the progress record's `gates` and an event line; Airflow keeps the response and the call in its audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import AirflowFailException, DagRunTriggerException

from pgactive_upgrade import config, progress
from pgactive_upgrade.airflow import state
from pgactive_upgrade.airflow.operators import checked_event, lag_trigger
from pgactive_upgrade.airflow.session import request_from, upgrade_from
from pgactive_upgrade.events import emit

APPROVE, CONTINUE, ACCEPT, KEEP_WAITING, ROLL_BACK, STOP = (
    "Approve", "Continue", "Accept and continue", "Keep waiting", "Roll back", "Stop")
ALL_OPTIONS = [APPROVE, CONTINUE, ACCEPT, KEEP_WAITING, ROLL_BACK, STOP]
ROLLBACK_DAG_ID = "pgactive_upgrade_rollback"
TIMEOUT = "timeout"  # who answered, when nobody did


@dataclass(frozen=True)
class Question:
    kind: str  # cutover, decommission, lag, conflicts, apply_errors, conflicts_and_apply_errors
    subject: str
    body: str
    options: tuple[str, ...]


class UpgradeGateOperator(HITLOperator):
    """Base of the gates: `question` says whether (and what) to ask; an answer of Stop fails the run at the gate,
    Roll back halts it and triggers pgactive_upgrade_rollback, any other answer goes to `after_answer`."""

    ui_color = "#fff4d6"

    def __init__(self, **kwargs):
        # Subject, body, options, timeout and default are set per run from the conf and the situation (execute);
        # the full option list here is what a resumed task accepts.
        super().__init__(subject="pgactive upgrade gate", options=list(ALL_OPTIONS), **kwargs)

    def question(self, context, request: config.UpgradeRequest) -> Question | None:
        raise NotImplementedError

    def after_answer(self, context, request: config.UpgradeRequest, answer: str, question_kind: str) -> Any:
        return {"answer": answer}

    def execute(self, context) -> Any:
        request = request_from(context)
        state.check_not_halted(context, request.source_identifier)
        question = self.question(context, request)
        if question is None:
            return {"asked": False}
        return self.ask(context, request, question)

    def ask(self, context, request: config.UpgradeRequest, question: Question) -> Any:
        timeout = timedelta(minutes=request.gate_timeout_minutes)
        self.subject, self.body, self.options = question.subject, question.body, list(question.options)
        self.defaults = [request.gate_timeout_answer]
        self.response_timeout = timeout
        pending = {"task": self._key(context), "kind": question.kind, "subject": question.subject,
                   "options": list(question.options), "asked_at": progress.now(),
                   "timeout_minutes": request.gate_timeout_minutes, "on_timeout": request.gate_timeout_answer}
        state.record_step(context, request.source_identifier, self.task_id, progress.AWAITING_INPUT, pending_gate=pending)
        emit("gate_asked", gate=pending["task"], kind=question.kind, options=list(question.options))
        return super().execute(context)  # the task waits in awaiting_input; execute_complete resumes it

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        response = super().execute_complete(context, event)
        request = request_from(context)
        answer = response["chosen_options"][0]
        user = response.get("responded_by_user") or {}
        who = user.get("name") or user.get("id") or TIMEOUT
        kind = self._asked_kind(context, request)
        entry = {"task": self._key(context), "kind": kind, "answer": answer, "by": who,
                 "by_id": user.get("id"), "at": response["responded_at"].isoformat(),
                 "timed_out": bool(event.get("timedout")) or not user}
        state.append_gate(request.source_identifier, context["run_id"], entry)
        emit("gate_answered", gate=entry["task"], kind=kind, answer=answer, by=who, timed_out=entry["timed_out"])
        if answer == STOP:
            raise AirflowFailException(f"{entry['task']}: stopped by {who} at {entry['at']} (answer {STOP}); "
                                       "clear this task to be asked again")
        if answer == ROLL_BACK:
            self.roll_back(context, request, who, f"{kind} gate {entry['task']}: answered {ROLL_BACK} by {who}")
        state.record_step(context, request.source_identifier, self.task_id, "done")
        return self.after_answer(context, request, answer, kind)

    def _asked_kind(self, context, request) -> str:
        question = self.question(context, request)
        return question.kind if question else "unknown"

    def roll_back(self, context, request: config.UpgradeRequest, who: str, reason: str) -> None:
        """Halts the run at once (no later step acts), then has the task runner trigger pgactive_upgrade_rollback,
        as TriggerDagRunOperator does; that run inherits the upgrade's triggering user, and names who answered."""
        ti = context["ti"]
        # Run ids allow letters, digits and _.~:+- only (no brackets): the map index is spelled out.
        rollback_run_id = f"gate__{self.task_id}_{ti.map_index}__try{ti.try_number}__{context['run_id']}"[:250]
        halt = progress.halt_record(run_id=context["run_id"], requested_by=who, reason=reason,
                                    rollback_run_id=rollback_run_id)
        state.write(progress.halt_key(request.source_identifier), halt)
        state.merge_if_run(request.source_identifier, context["run_id"],
                           {"run_state": progress.HALTED, "halted_by": halt, "step": self.task_id, "state": progress.HALTED})
        emit("gate_rollback_triggered", rollback_run_id=rollback_run_id, by=who)
        raise DagRunTriggerException(
            trigger_dag_id=ROLLBACK_DAG_ID, dag_run_id=rollback_run_id,
            conf={"source_instance": request.source_instance, "reason": reason[:500], "requested_by": who[:200]},
            logical_date=None, reset_dag_run=False, skip_when_already_exists=True, wait_for_completion=False,
            allowed_states=["success"], failed_states=["failed"], poke_interval=60, deferrable=False,
            note=f"rollback requested at {self._key(context)} by {who}",
        )

    def _key(self, context) -> str:
        index = context["ti"].map_index
        return self.task_id if index in (None, -1) else f"{self.task_id}[{index}]"


class ApprovalGateOperator(UpgradeGateOperator):
    """Before the cutover (approve_cutover) or before the old node is detached and deleted (approve_decommission)."""

    def __init__(self, *, before: str, **kwargs):
        super().__init__(**kwargs)
        if before not in ("cutover", "decommission"):
            raise ValueError(f"before: expected cutover or decommission, got {before!r}")
        self.before = before

    def asks(self, request: config.UpgradeRequest) -> bool:
        """Whether this gate asks at all: the step before it skips it otherwise (no task process is started)."""
        return request.approve_cutover if self.before == "cutover" else request.asks_before_decommission

    def question(self, context, request):
        if not self.asks(request):
            return None
        if self.before == "cutover":
            verified = context["ti"].xcom_pull(task_ids="verify_before_cutover") or {}
            return Question("cutover", f"Approve the cutover of {request.source_identifier}?",
                            f"Every write moves to the new instance ({request.target_engine_version}) in a fenced switch "
                            f"of at most {request.cutover_deadline_seconds} s.\n\nVerification before cutover: "
                            f"{_figures(verified)}.\n\n**Stop** keeps traffic where it is (clear this task to be asked "
                            f"again); **Roll back** returns every route to {request.source_identifier}.",
                            (APPROVE, ROLL_BACK, STOP))
        verified = context["ti"].xcom_pull(task_ids="verify") or {}
        action = ("detached from replication, snapshotted and **deleted**" if request.decommission == "delete"
                  else "kept (decommission: keep)")
        return Question("decommission", f"Approve decommissioning {request.source_identifier}?",
                        f"The old instance {request.source_identifier} will be {action}. After the detach, a "
                        f"rollback is no longer possible.\n\nVerification after cutover: {_figures(verified)}.",
                        (APPROVE, ROLL_BACK, STOP))


class PhaseDecisionOperator(UpgradeGateOperator):
    """The last task of a traffic phase: asks when its health check escalated lag that stayed above the threshold
    for lag_escalation_minutes, or found new conflicts or new apply errors while replication kept flowing; the next
    phase waits for this task. Keep waiting: waits (deferred) for the lag to come under the threshold, and asks again
    after another lag_escalation_minutes."""

    def __init__(self, *, check_task_id: str, poll_interval: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.check_task_id = check_task_id
        self.poll_interval = poll_interval

    def question(self, context, request, lag_bytes: int | None = None):
        ti = context["ti"]
        found = ti.xcom_pull(task_ids=self.check_task_id, map_indexes=ti.map_index) or {}
        phase = f"phase {ti.map_index} ({found.get('percent')} %)"
        if found.get("gate") == "lag":
            causes = "".join(f"\n- {cause}" for cause in found.get("lag_causes") or [])
            return Question("lag", f"Replication lag stays high after {phase} of {request.source_identifier}",
                            f"Lag is {lag_bytes or found.get('lag_bytes')} bytes, above lag_threshold_bytes "
                            f"{request.lag_threshold_bytes}, for over {request.lag_escalation_minutes} min. The shifts "
                            f"are paused at the current split.{causes}\n\n**Keep waiting**: wait again (asked again in "
                            f"{request.lag_escalation_minutes} min if still high); **Continue**: the next phase goes "
                            "on; **Roll back**: every route back to the source; **Stop**: the run fails here.",
                            (KEEP_WAITING, CONTINUE, ROLL_BACK, STOP))
        if found.get("gate") in ("conflicts", "apply_errors", "conflicts_and_apply_errors"):
            return _accept_question(found, phase, request.source_identifier)
        return None

    def after_answer(self, context, request, answer, question_kind):
        if answer != KEEP_WAITING:
            return {"answer": answer}
        state.record_step(context, request.source_identifier, self.task_id, "waiting", waiting_for="lag under threshold")
        upgrade = upgrade_from(context, recorded_instances=True)
        self.defer(trigger=lag_trigger(upgrade, context, self.poll_interval, fire_on_escalation=True),
                   method_name="after_waiting",
                   timeout=timedelta(minutes=request.lag_escalation_minutes + 10))

    def after_waiting(self, context, event: dict[str, Any] | None = None) -> Any:
        event = checked_event(event, "halted", "synced", "escalated")
        if event["status"] == "halted":
            raise AirflowFailException(f"halted by rollback while waiting for lag: {event['halt']}")
        request = request_from(context)
        if event["status"] == "synced":
            emit("lag_recovered", lag_bytes=event["lag_bytes"])
            state.record_step(context, request.source_identifier, self.task_id, "done",
                              replication_lag_bytes=event["lag_bytes"], lag_measured_at=progress.now())
            return {"answer": KEEP_WAITING, "lag_bytes": event["lag_bytes"]}
        return self.ask(context, request, self.question(context, request, lag_bytes=event["lag_bytes"]))


def _accept_question(found: dict, phase: str, source: str) -> Question:
    """New conflicts and/or apply errors recorded while replication kept flowing: accept them, or roll back."""
    sections, what = [], []
    if found.get("conflicts"):
        what.append("conflicts")
        sections.append("New conflicts (pgactive_conflict_history on each node):" +
                        "".join(f"\n- {row}" for row in found["conflicts"]))
    if found.get("apply_errors"):
        what.append("apply errors")
        sections.append("New apply errors, recorded while replication kept flowing (a row written after them reached "
                        "the other node):" + "".join(f"\n- {line}" for line in found["apply_errors"]))
    return Question(found["gate"], f"Replication {' and '.join(what)} after {phase} of {source}",
                    "\n\n".join(sections) + "\n\n**Accept and continue**: these are accepted, only later ones are "
                    "reported; **Roll back**: every route back to the source; **Stop**: the run fails here.",
                    (ACCEPT, ROLL_BACK, STOP))


def _figures(result: dict) -> str:
    if not result:
        return "no result recorded"
    keys = ("rows", "chunks", "rows_per_second", "sequences", "unchecked")
    return ", ".join(f"{key} {result[key]}" for key in keys if key in result) or "done"
