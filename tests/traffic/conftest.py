"""Fixtures for the traffic tests (the parts themselves live in traffic_parts.py)."""
from __future__ import annotations

import re
import subprocess
import threading
import time

import boto3
import pytest
from traffic_parts import (MOTO_PORT, MOTO_SERVER, SOURCE_PORT, SPARE_PORT, TARGET_PORT, NamedServer, start_haproxy,
                           stop, wait_for_port)


@pytest.fixture(scope="session")
def named_servers():
    servers = [NamedServer("source", SOURCE_PORT), NamedServer("target", TARGET_PORT)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield {s.name: s for s in servers}
    for server, thread in zip(servers, threads):
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def haproxy(named_servers, tmp_path):
    """HAProxy with backends pg_write/pg_read, servers source (weight 100) and target (weight 0)."""
    proc, apis = start_haproxy(tmp_path, TARGET_PORT)
    yield apis
    stop(proc)


@pytest.fixture
def haproxy_target_elsewhere(named_servers, tmp_path):
    """Same, but the target servers point at a port where nothing listens."""
    proc, apis = start_haproxy(tmp_path, SPARE_PORT)
    yield apis
    stop(proc)


@pytest.fixture(scope="session")
def moto_endpoint():
    proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(MOTO_PORT, proc)
    yield f"http://127.0.0.1:{MOTO_PORT}"
    stop(proc)


@pytest.fixture
def route53(moto_endpoint):
    return boto3.client("route53", endpoint_url=moto_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def hosted_zone(route53, request):
    """A fresh private zone per test, named after the test so records never collide."""
    name = f"{re.sub('[^a-z0-9]+', '-', request.node.name.lower())[:40].strip('-')}.example.internal"
    zone = route53.create_hosted_zone(Name=name, CallerReference=f"{name}-{time.time_ns()}")
    return zone["HostedZone"]["Id"].split("/")[-1], name
