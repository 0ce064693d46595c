"""Shared pieces of the RDS tests: the moto server address and botocore event hooks on the client under test.

Faults are injected with `before-call` hooks: the hook answers with an HTTP 400 error body, so botocore raises the
same modeled exception a real RDS endpoint would. moto itself is never patched.
"""

import functools

import boto3
from botocore.awsrequest import AWSResponse

MOTO_PORT = 26850
MOTO_URL = f"http://127.0.0.1:{MOTO_PORT}"
SECRET = "s3cret-Passw0rd"


def new_client(service: str):
    return boto3.client(service, endpoint_url=MOTO_URL, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


shared_client = functools.cache(new_client)  # client creation is slow; hooks go only on the per-test rds client


def fail_first_calls(rds, operation: str, code: str, times: int = 1) -> list:
    """Make the next `times` calls of `operation` fail with `code`; returns the list of intercepted calls."""
    calls = []

    def hook(**_):
        calls.append(operation)
        if len(calls) <= times:
            body = {"Error": {"Code": code, "Message": "injected fault"}, "ResponseMetadata": {"HTTPStatusCode": 400}}
            return AWSResponse(MOTO_URL, 400, {}, None), body
        return None

    rds.meta.events.register(f"before-call.rds.{operation}", hook)
    return calls


def record_calls(rds) -> list[str]:
    """Names of every RDS operation the client sends from now on, in order."""
    calls = []
    rds.meta.events.register("before-call.rds", lambda model, **_: calls.append(model.name))
    return calls


def settle(rds, identifier: str, group: str, *, may_reboot: bool = True, reboot: bool = False, rounds: int = 10) -> bool:
    """settle_parameter_group run as the Airflow layer runs it: each Wait is waited out as the trigger would (here by
    polling describe), then the step runs again, without the reboot its first call was asked for (that call made
    it, or the instance was busy). Returns whether any call rebooted."""
    from pgactive_upgrade import rds as r

    rebooted = False
    for _ in range(rounds):
        wait, did = r.settle_parameter_group(rds, identifier, group, may_reboot=may_reboot, reboot=reboot)
        rebooted, reboot = rebooted or did, reboot and not did
        if wait is None:
            return rebooted
        wait_out(rds, wait)
    raise AssertionError(f"{identifier} did not settle in {rounds} steps")


def wait_out(rds, wait, polls: int = 20) -> None:
    """What the trigger waits for: available, or available and in-sync."""
    from pgactive_upgrade import rds as r

    for _ in range(polls):
        info = r.describe_instance(rds, wait.identifier)
        if info.status == "available" and (wait.until != r.IN_SYNC or info.parameter_apply_status == "in-sync"):
            return
    raise AssertionError(f"{wait} never held")


def until_done(step, rounds: int = 10):
    """A step that may return a Wait, run again until it returns its result (moto is instant)."""
    from pgactive_upgrade import rds as r

    for _ in range(rounds):
        result = step()
        if not isinstance(result, r.Wait):
            return result
    raise AssertionError(f"not done in {rounds} steps: {result}")
