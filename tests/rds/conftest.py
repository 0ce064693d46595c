import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pgactive_upgrade import rds as r
from rds_parts import MOTO_PORT, MOTO_URL, SECRET, new_client, shared_client

MOTO_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "moto_server"


def _wait_for_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on {port}")


@pytest.fixture(scope="session")
def moto_server():
    proc = subprocess.Popen([str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(MOTO_PORT)
        yield MOTO_URL
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def rds(moto_server):
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).read()
    return new_client("rds")


@pytest.fixture
def network(rds):
    ec2 = shared_client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
               for i, az in ((1, "us-east-1a"), (2, "us-east-1b"))]
    sg = ec2.create_security_group(GroupName="orders-db", Description="db", VpcId=vpc)["GroupId"]
    for name in ("orders-subnets", "other-subnets"):
        rds.create_db_subnet_group(DBSubnetGroupName=name, DBSubnetGroupDescription=name, SubnetIds=subnets)
    return {"subnet_group": "orders-subnets", "sg": sg}


@pytest.fixture
def source(rds, network):
    rds.create_db_instance(
        DBInstanceIdentifier="orders-db", Engine="postgres", EngineVersion="15.8", DBInstanceClass="db.r6g.large",
        AllocatedStorage=100, StorageType="gp3", DBSubnetGroupName=network["subnet_group"],
        VpcSecurityGroupIds=[network["sg"]], MasterUsername="dbadmin", MasterUserPassword=SECRET, DBName="orders",
        MultiAZ=True, StorageEncrypted=True, BackupRetentionPeriod=7,
    )
    return r.resolve_source(rds, "orders-db")
