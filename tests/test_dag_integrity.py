"""Every DAG file imports under Airflow 3.3 with no errors, and the upgrade DAG has the runbook's shape."""

from pathlib import Path

from airflow.dag_processing.dagbag import DagBag

DAGS = Path(__file__).resolve().parent.parent / "dags"


def load() -> DagBag:
    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors():
    bag = load()
    assert bag.import_errors == {}
    assert len(list(DAGS.glob("*.py"))) == len({dag.fileloc for dag in bag.dags.values()})


def test_upgrade_dag_runs_the_steps_in_order_with_the_prd_timeouts():
    dag = load().dags["pgactive_rolling_upgrade"]
    order = [
        "validate_request", "preflight", "provision_target", "configure_parameters", "install_extension",
        "init_replication_group.build_replication", "wait_for_sync", "prepare_target", "traffic_phase.wait_for_previous_phase",
        "traffic_phase.shift", "traffic_phase.health_check", "traffic_phase.decide", "verify_before_cutover",
        "approve_cutover", "refresh_views_before_cutover", "cutover", "verify", "approve_decommission",
        "detach_old_node", "decommission_source",
    ]
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids, (upstream, downstream)
    assert dag.get_task("provision_target").execution_timeout.total_seconds() == 15 * 60
    assert dag.get_task("wait_for_sync").timeout == 24 * 3600
    assert dag.max_active_runs > 1, "a fleet of sources upgrades side by side"
    from airflow.providers.standard.operators.hitl import HITLOperator

    gates = [task.task_id for task in dag.tasks if isinstance(task, HITLOperator)]
    assert gates == ["traffic_phase.decide", "approve_cutover", "approve_decommission"], gates
    # An approval gate with nothing to ask is skipped by its verification; what follows the gate needs that
    # verification's success too, so a skip by anyone else (a task marked skipped) never lets the run go on.
    for verification, gate, after in (("verify_before_cutover", "approve_cutover", "refresh_views_before_cutover"),
                                      ("verify", "approve_decommission", "detach_old_node")):
        step = dag.get_task(after)
        assert step.upstream_task_ids == {verification, gate} and step.trigger_rule == "none_failed_min_one_success"
        assert dag.get_task(verification).inherits_from_skipmixin
    assert dag.get_task("preflight").inherits_from_skipmixin, "a cleared task of a plan_only run is skipped again"
    assert all(task.on_failure_callback for task in dag.tasks), "every failure reaches the progress record"
    assert dag.on_success_callback and dag.on_failure_callback
    assert dag.doc_md


def test_params_carry_the_conf_schema_and_require_the_source():
    params = load().dags["pgactive_rolling_upgrade"].params
    assert "source_instance" in params and "traffic" in params
    assert params.get_param("shift_percentages").schema["items"]["maximum"] == 100
