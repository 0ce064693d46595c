"""The modules an upgrade step imports, for a deployment to preload in the processes its task processes fork
from (README: "A fleet of upgrades on one Airflow"):

    AIRFLOW__SCHEDULER__MP_START_METHOD=forkserver
    AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD=pgactive_upgrade.airflow.preload

Each task process then inherits them instead of importing them again: about 0.6 s of CPU per step (bench/fleet.py;
tests/unit/test_task_start_imports.py keeps this list complete). The package's own code too, read afresh by every
process forked after a file of it changed (own_code.py), so a new version of it needs no restart.
"""

import gc
import inspect

import boto3  # noqa: F401
import psycopg2.errorcodes  # noqa: F401
import psycopg2.extras  # noqa: F401
import psycopg2.sql  # noqa: F401
from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook  # noqa: F401
from airflow.providers.amazon.aws.hooks.rds import RdsHook  # noqa: F401
from airflow.providers.amazon.aws.triggers.rds import RdsDbAvailableTrigger  # noqa: F401
from airflow.providers.postgres.hooks.postgres import PostgresHook  # noqa: F401
from airflow.providers.standard.operators.hitl import HITLOperator  # noqa: F401
from airflow.sdk import BaseSensorOperator, task_group  # noqa: F401
from airflow.sdk.execution_time import supervisor, task_runner  # noqa: F401
from airflow.dag_processing import dagbag  # noqa: F401

# Sessions made by the shared-data factory (aws_session.py, when the deployment sets it) read botocore's endpoint and
# service files parsed here, once, instead of parsing them again in every task process.
from pgactive_upgrade.airflow import aws_session  # noqa: E402  # after base_aws, which imports it when configured

aws_session.parse_service_data()

# The package's own code, as the DAG files import it; read afresh after it changes (own_code.py).
from pgactive_upgrade.airflow import own_code  # noqa: E402

own_code.preload(("pgactive_upgrade.airflow.operators", "pgactive_upgrade.airflow.gates",
                  "pgactive_upgrade.airflow.callbacks", "pgactive_upgrade.airflow.params"))

# Each AWS client the hooks make walks the call stack to name its caller (the provider's user agent), and the first
# walk in a process maps every loaded module to its file: about 0.07 s of CPU per task process, done once here.
inspect.getmodule(None, _filename="<preload: map loaded modules to files>")

# Last: with the fork start method Airflow freezes the scheduler's objects before it forks its workers
# (LocalExecutor._spawn_workers_with_gc_freeze); with the forkserver they fork from here instead. Frozen, what the
# preload made is left out of every task process's garbage collections (a full one over it costs about 0.2 s of CPU)
# and its memory pages stay shared. Collected first: garbage frozen would stay for the life of every process.
gc.collect()
gc.freeze()
