"""IAM roles for the test scripts: `ensure_role(key, url, name)` makes (or reuses) a role of
the key's account, assumable by the account, through the daemon's IAM, and answers its ARN:
what a test names as executionRoleArn or buildRoleArn.
"""
import json

import boto3
import botocore
from botocore.config import Config


def trust_of(account):
    """A trust policy letting `account` (its root and, with their own policies, its roles) assume the role."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": "sts:AssumeRole"}]})


def ensure_role(key, url, name, policy=None):
    """The ARN of role `name` of `key`'s account (a JSON access key: accessKeyId,
    secretAccessKey, account), created when missing; `policy` (a dict) is put as its inline
    policy `main` when given."""
    iam = boto3.client("iam", endpoint_url=url, region_name="hh-local-1",
                       aws_access_key_id=key["accessKeyId"], aws_secret_access_key=key["secretAccessKey"],
                       config=Config(retries={"max_attempts": 1, "mode": "standard"}))
    try:
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust_of(key["account"]))["Role"]["Arn"]
    except botocore.exceptions.ClientError as e:
        if e.response["Error"]["Code"] != "EntityAlreadyExists":
            raise
        arn = iam.get_role(RoleName=name)["Role"]["Arn"]
    if policy is not None:
        iam.put_role_policy(RoleName=name, PolicyName="main", PolicyDocument=json.dumps(policy))
    return arn
