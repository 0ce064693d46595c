"""AWS side of the demo inside moto: network plus the source RDS instance."""
from __future__ import annotations

import boto3

REGION = "us-east-1"
TEST_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
VPC_NAME = "pgu-local"
VPC_CIDR = "10.20.0.0/16"
SUBNETS = (("us-east-1a", "10.20.1.0/24"), ("us-east-1b", "10.20.2.0/24"))
DB_SUBNET_GROUP = "app-subnets"
SECURITY_GROUP = "pgu-postgres"


def client(service: str, endpoint_url: str):
    return boto3.client(service, endpoint_url=endpoint_url, region_name=REGION, **TEST_CREDENTIALS)


def seed_aws(endpoint_url: str, source_instance_id: str, master_password: str) -> dict:
    ec2 = client("ec2", endpoint_url)
    rds = client("rds", endpoint_url)
    vpc_id = _ensure_vpc(ec2)
    subnet_ids = [_ensure_subnet(ec2, vpc_id, zone, cidr) for zone, cidr in SUBNETS]
    security_group_id = _ensure_security_group(ec2, vpc_id)
    _ensure_db_subnet_group(rds, subnet_ids)
    _ensure_source_instance(rds, source_instance_id, master_password, security_group_id)
    return {
        "source_instance_id": source_instance_id,
        "db_subnet_group": DB_SUBNET_GROUP,
        "security_group_ids": [security_group_id],
        "region": REGION,
    }


def _ensure_vpc(ec2) -> str:
    found = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": [VPC_NAME]}])["Vpcs"]
    if found:
        return found[0]["VpcId"]
    vpc_id = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    ec2.create_tags(Resources=[vpc_id], Tags=[{"Key": "Name", "Value": VPC_NAME}])
    return vpc_id


def _ensure_subnet(ec2, vpc_id: str, zone: str, cidr: str) -> str:
    found = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                         {"Name": "cidr-block", "Values": [cidr]}])["Subnets"]
    if found:
        return found[0]["SubnetId"]
    return ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]


def _ensure_security_group(ec2, vpc_id: str) -> str:
    found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                                  {"Name": "group-name", "Values": [SECURITY_GROUP]}])["SecurityGroups"]
    if found:
        return found[0]["GroupId"]
    group_id = ec2.create_security_group(GroupName=SECURITY_GROUP, Description="PostgreSQL from inside the VPC",
                                         VpcId=vpc_id)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": VPC_CIDR}],
    }])
    return group_id


def _ensure_db_subnet_group(rds, subnet_ids: list[str]) -> None:
    try:
        rds.describe_db_subnet_groups(DBSubnetGroupName=DB_SUBNET_GROUP)
    except rds.exceptions.DBSubnetGroupNotFoundFault:
        rds.create_db_subnet_group(DBSubnetGroupName=DB_SUBNET_GROUP, DBSubnetGroupDescription="app database subnets",
                                   SubnetIds=subnet_ids)


def _ensure_source_instance(rds, instance_id: str, master_password: str, security_group_id: str) -> None:
    try:
        rds.describe_db_instances(DBInstanceIdentifier=instance_id)
        return
    except rds.exceptions.DBInstanceNotFoundFault:
        pass
    rds.create_db_instance(
        DBInstanceIdentifier=instance_id,
        Engine="postgres",
        EngineVersion="15.8",
        DBInstanceClass="db.t3.medium",
        AllocatedStorage=100,
        StorageType="gp3",
        MasterUsername="postgres",
        MasterUserPassword=master_password,
        DBName="app",
        Port=5432,
        DBSubnetGroupName=DB_SUBNET_GROUP,
        VpcSecurityGroupIds=[security_group_id],
        PubliclyAccessible=False,
        Tags=[{"Key": "app", "Value": "orders"}],
    )
