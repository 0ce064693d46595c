"""
### Roll back a rolling upgrade

Triggered by an operator at any moment of a `pgactive_rolling_upgrade` run: during sync, mid-phase,
during a health check or after cutover. It halts the upgrade run (none of its remaining steps acts),
returns every route to the source instance, and keeps replication running: after a one-way cutover the
reverse replication has kept the source current, and the target is fenced before traffic returns.

Who asked, when and why are recorded in this run's conf, its log and its result. Running it twice is harmless.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from pgactive_upgrade.airflow.operators import CutoverWatchdogOperator, RollbackOperator
from pgactive_upgrade.airflow.params import rollback_params

with DAG(
    dag_id="pgactive_upgrade_rollback",
    description="Return all traffic to the source of a rolling upgrade, keeping replication",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,  # one rollback at a time; each takes the upgrade's lock on the source anyway
    params=rollback_params(),
    tags=["postgres", "rds", "upgrade", "rollback"],
    default_args={"retries": 0},
) as dag:
    # At most: a live cutover's deadline, then the rollback's own fenced switch with the same deadline (10 min each).
    RollbackOperator(task_id="roll_back", execution_timeout=timedelta(minutes=25))
    # Beside it, in the triggerer: settles the rollback's switch within seconds if its process dies mid-way.
    CutoverWatchdogOperator(task_id="switch_watchdog", cutover_task_id="roll_back", upgrade_from_record=True,
                            execution_timeout=timedelta(hours=1),
                            # it defers: a busy scheduler may fail its resumed try (see pgactive_rolling_upgrade.py)
                            retries=2, retry_delay=timedelta(seconds=10))
