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
