"""IAM roles and STS sessions of a running `hearth serve`, through boto3's `iam` and `sts`
clients and the AWS CLI: roles and inline policies, refusals with IAM's codes, AssumeRole,
calls with the temporary credentials allowed and denied by the role's policies, and
expired, forged and revoked session tokens, KMS keys handed over without permission on them.

Run by crates/cli/tests/iam.rs. Environment: HEARTH_URL, HEARTH_KEY_A / HEARTH_KEY_B (two
tenants), HEARTH_STATE (the daemon's state directory: the test ages a session there, as
time would), HEARTH_AWS (the AWS CLI).
"""
import json
import os
import sqlite3
import subprocess
import tempfile
import urllib.request

import boto3
import botocore
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

import roles

URL = os.environ["HEARTH_URL"]
KEY_A = json.loads(os.environ["HEARTH_KEY_A"])
KEY_B = json.loads(os.environ["HEARTH_KEY_B"])
STATE = os.environ["HEARTH_STATE"]
AWS = os.environ["HEARTH_AWS"]
CFG = Config(retries={"max_attempts": 1, "mode": "standard"})
A = KEY_A["account"]


def client(service, key=None, creds=None):
    if creds is not None:
        ids = dict(aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                   aws_session_token=creds["SessionToken"])
    else:
        ids = dict(aws_access_key_id=key["accessKeyId"], aws_secret_access_key=key["secretAccessKey"])
    region = "us-east-1" if service == "lambda-microvms" else "hh-local-1"
    return boto3.client(service, endpoint_url=URL, region_name=region, config=CFG, **ids)


def expect_error(code, status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
        assert got == (code, status), f"expected {code} {status}, got {got}: {e}"
        return e.response["Error"].get("Message", "")
    raise AssertionError(f"expected {code}, the call succeeded")


def trust(principal):
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}]})


def policy(*statements):
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def roles_and_policies():
    iam = client("iam", KEY_A)
    r = iam.create_role(RoleName="app", AssumeRolePolicyDocument=trust(A), Description="the app",
                        MaxSessionDuration=7200, Tags=[{"Key": "team", "Value": "x"}])["Role"]
    assert r["RoleId"].startswith("AROA") and r["Arn"] == f"arn:aws:iam::{A}:role/app", r
    assert r["AssumeRolePolicyDocument"] == json.loads(trust(A)), "botocore decodes the URL-encoded document"
    assert r["MaxSessionDuration"] == 7200 and r["Tags"] == [{"Key": "team", "Value": "x"}]
    got = iam.get_role(RoleName="app")["Role"]
    assert got["RoleId"] == r["RoleId"] and got["CreateDate"] == r["CreateDate"], got
    expect_error("EntityAlreadyExists", 409, iam.create_role, RoleName="APP", AssumeRolePolicyDocument=trust(A))
    expect_error("NoSuchEntity", 404, iam.get_role, RoleName="nope")
    expect_error("ValidationError", 400, iam.create_role, RoleName="bad name", AssumeRolePolicyDocument=trust(A))
    expect_error("ValidationError", 400, iam.create_role, RoleName="short", AssumeRolePolicyDocument=trust(A), MaxSessionDuration=100000)
    # ListRoles in pages.
    for n in ("p1", "p2", "p3"):
        iam.create_role(RoleName=n, Path="/paged/", AssumeRolePolicyDocument=trust(A))
    first = iam.list_roles(PathPrefix="/paged/", MaxItems=2)
    assert [x["RoleName"] for x in first["Roles"]] == ["p1", "p2"] and first["IsTruncated"], first
    rest = iam.list_roles(PathPrefix="/paged/", MaxItems=2, Marker=first["Marker"])
    assert [x["RoleName"] for x in rest["Roles"]] == ["p3"] and not rest["IsTruncated"], rest
    assert {x["RoleName"] for x in iam.list_roles()["Roles"]} == {"app", "p1", "p2", "p3"}
    # Inline policies.
    doc = policy(
        {"Sid": "Read", "Effect": "Allow", "Action": ["iam:GetRole", "iam:List*"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["lambda:ListMicrovms", "lambda:RunMicrovm"], "Resource": "*"},
        {"Effect": "Deny", "Action": "iam:ListRolePolicies", "Resource": f"arn:aws:iam::{A}:role/app"},
    )
    iam.put_role_policy(RoleName="app", PolicyName="read", PolicyDocument=doc)
    got = iam.get_role_policy(RoleName="app", PolicyName="read")
    assert got["PolicyDocument"] == json.loads(doc) and got["RoleName"] == "app", got
    assert iam.list_role_policies(RoleName="app")["PolicyNames"] == ["read"]
    expect_error("NoSuchEntity", 404, iam.get_role_policy, RoleName="app", PolicyName="nope")
    expect_error("DeleteConflict", 409, iam.delete_role, RoleName="app")
    # Malformed policies and unknown actions: refused, naming why.
    for bad, why in [
        ("not json", "not JSON"),
        (policy({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}), "s3"),
        (policy({"Effect": "Allow", "Action": "iam:Frobnicate", "Resource": "*"}), "iam:Frobnicate"),
        (policy({"Effect": "Allow", "Action": "iam:GetRole", "Resource": "*",
                 "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}), "IpAddress"),
        (policy({"Effect": "Allow", "Action": "iam:GetRole", "Resource": "*",
                 "Condition": {"StringEquals": {"aws:SourceVpc": "vpc-1"}}}), "aws:SourceVpc"),
        (policy({"Effect": "Allow", "Action": "iam:GetRole"}), "Resource"),
    ]:
        msg = expect_error("MalformedPolicyDocument", 400, iam.put_role_policy, RoleName="app", PolicyName="bad", PolicyDocument=bad)
        assert why in msg, (why, msg)
    expect_error("MalformedPolicyDocument", 400, iam.create_role, RoleName="t", AssumeRolePolicyDocument=policy(
        {"Effect": "Allow", "Principal": {"Federated": "x"}, "Action": "sts:AssumeRole"}))
    for n in ("p1", "p2", "p3"):
        iam.delete_role(RoleName=n)
    print("roles and policies: ok")


def sessions():
    sts_a = client("sts", KEY_A)
    me = sts_a.get_caller_identity()
    assert me["Arn"] == f"arn:aws:iam::{A}:root" and me["Account"] == A, me
    arn = f"arn:aws:iam::{A}:role/app"
    out = sts_a.assume_role(RoleArn=arn, RoleSessionName="agent", DurationSeconds=900)
    creds = out["Credentials"]
    assert creds["AccessKeyId"].startswith("HSIA") and len(creds["SecretAccessKey"]) == 40, creds
    assert out["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{A}:assumed-role/app/agent", out
    expect_error("ValidationError", 400, sts_a.assume_role, RoleArn=arn, RoleSessionName="agent", DurationSeconds=8000)
    # With the temporary credentials: who am I, an allowed call, denied ones.
    who = client("sts", creds=creds).get_caller_identity()
    assert who["Arn"] == f"arn:aws:sts::{A}:assumed-role/app/agent" and who["UserId"].endswith(":agent"), who
    iam_s = client("iam", creds=creds)
    assert iam_s.get_role(RoleName="app")["Role"]["Arn"] == arn
    assert iam_s.list_roles()["Roles"]
    expect_error("AccessDenied", 403, iam_s.create_role, RoleName="escalate", AssumeRolePolicyDocument=trust(A))
    expect_error("AccessDenied", 403, iam_s.put_role_policy, RoleName="app", PolicyName="admin",
                 PolicyDocument=policy({"Effect": "Allow", "Action": "*", "Resource": "*"}))
    # The explicit Deny wins over the `iam:List*` Allow.
    expect_error("AccessDenied", 403, iam_s.list_role_policies, RoleName="app")
    # The Lambda API with the same credentials: what the role allows, no more.
    lam = client("lambda-microvms", creds=creds)
    lam.list_microvms()
    expect_error("AccessDeniedException", 403, lam.list_microvm_images)
    # Running a microvm under a role needs iam:PassRole on it (else a narrow session could
    # run one under a broader role and read its credentials from inside).
    msg = expect_error("AccessDeniedException", 403, lam.run_microvm, imageIdentifier="nope", executionRoleArn=arn)
    assert "iam:PassRole" in msg, msg
    expect_error("ResourceNotFoundException", 404, lam.run_microvm, imageIdentifier="nope")
    # A role may not assume another without its own policy allowing it (and the trust).
    expect_error("AccessDenied", 403, client("sts", creds=creds).assume_role, RoleArn=arn, RoleSessionName="again")
    # Forged, missing and another session's tokens: 403.
    forged = dict(creds, SessionToken=creds["SessionToken"][:-4] + "AAAA")
    expect_error("InvalidClientTokenId", 403, client("sts", creds=forged).get_caller_identity)
    expect_error("UnrecognizedClientException", 403, client("lambda-microvms", creds=forged).list_microvms)
    missing = boto3.client("sts", endpoint_url=URL, region_name="hh-local-1", config=CFG,
                           aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"])
    expect_error("InvalidClientTokenId", 403, missing.get_caller_identity)
    other = sts_a.assume_role(RoleArn=arn, RoleSessionName="other")["Credentials"]
    swapped = dict(creds, SessionToken=other["SessionToken"])
    expect_error("InvalidClientTokenId", 403, client("sts", creds=swapped).get_caller_identity)
    made_up = dict(creds, AccessKeyId="HSIA" + "A" * 16)
    expect_error("InvalidClientTokenId", 403, client("sts", creds=made_up).get_caller_identity)
    # Expired: age the session in the daemon's store, as time would.
    db = sqlite3.connect(os.path.join(STATE, "hearth.db"), timeout=30)
    (doc,) = db.execute("SELECT doc FROM docs WHERE kind = 'session' AND name = ?", (creds["AccessKeyId"],)).fetchone()
    assert creds["SecretAccessKey"] not in doc and creds["SessionToken"] not in doc, "session secrets stored as given"
    aged = dict(json.loads(doc), expiration=1.0)
    db.execute("UPDATE docs SET doc = ? WHERE kind = 'session' AND name = ?", (json.dumps(aged), creds["AccessKeyId"]))
    db.commit()
    db.close()
    expect_error("ExpiredToken", 400, client("sts", creds=creds).get_caller_identity)
    msg = expect_error("UnrecognizedClientException", 403, client("lambda-microvms", creds=creds).list_microvms)
    assert "expired" in msg, msg
    # A role deleted: its sessions stop.
    iam = client("iam", KEY_A)
    assert client("sts", creds=other).get_caller_identity()["Arn"].endswith("/app/other")
    iam.delete_role_policy(RoleName="app", PolicyName="read")
    iam.delete_role(RoleName="app")
    expect_error("InvalidClientTokenId", 403, client("sts", creds=other).get_caller_identity)
    iam.create_role(RoleName="app", AssumeRolePolicyDocument=trust(A))
    expect_error("InvalidClientTokenId", 403, client("sts", creds=other).get_caller_identity)
    print("sessions: ok")


def kms_keys():
    """Naming a KMS key (kmsKeyIdentifier) hands it to the service: a role session needs
    kms:GenerateDataKey and kms:Decrypt on the key itself, as on AWS, however it names it."""
    iam, kms = client("iam", KEY_A), client("kms", KEY_A)
    key = kms.create_key(Description="microvms")["KeyMetadata"]
    kms.create_alias(AliasName="alias/mvm", TargetKeyId=key["KeyId"])
    alias_arn = next(a["AliasArn"] for a in kms.list_aliases()["Aliases"] if a["AliasName"] == "alias/mvm")
    role = iam.create_role(RoleName="keyless", AssumeRolePolicyDocument=trust(A))["Role"]["Arn"]
    iam.put_role_policy(RoleName="keyless", PolicyName="run", PolicyDocument=policy(
        {"Effect": "Allow", "Action": ["lambda:*", "iam:PassRole"], "Resource": "*"}))
    creds = client("sts", KEY_A).assume_role(RoleArn=role, RoleSessionName="keyed")["Credentials"]
    lam = client("lambda-microvms", creds=creds)
    image = dict(name="keyed", baseImageArn="arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal",
                 buildRoleArn=role, codeArtifact={"uri": "hearth://artifacts/" + "0" * 64})
    update = {k: v for k, v in image.items() if k != "name"}
    calls = [(lam.run_microvm, dict(imageIdentifier="nope")), (lam.create_microvm_image, image),
             (lam.update_microvm_image, dict(update, imageIdentifier="keyed"))]

    def refused(action):
        for ident in (key["KeyId"], key["Arn"], "alias/mvm", alias_arn):
            for fn, kw in calls:
                msg = expect_error("AccessDeniedException", 403, fn, kmsKeyIdentifier=ident, **kw)
                assert action in msg and key["Arn"] in msg, (ident, msg)

    def passes(fn, **kw):
        # Past the check: the call fails for what it names (no such image, no such
        # artifact) with the model's 4xx, never a kms refusal nor a 5xx.
        try:
            fn(**kw)
        except botocore.exceptions.ClientError as e:
            err = e.response["Error"]
            assert err["Code"] in ("ResourceNotFoundException", "ValidationException", "ConflictException"), err
            assert "kms:" not in err.get("Message", ""), err
    refused("kms:GenerateDataKey")
    # One of the two is not enough; another key's permission is not this one's.
    iam.put_role_policy(RoleName="keyless", PolicyName="key", PolicyDocument=policy(
        {"Effect": "Allow", "Action": "kms:GenerateDataKey", "Resource": key["Arn"]},
        {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": key["Arn"] + "-other"}))
    refused("kms:Decrypt")
    # Both: past the check (the calls then fail for what they name: no such image, artifact).
    iam.put_role_policy(RoleName="keyless", PolicyName="key", PolicyDocument=policy(
        {"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": key["Arn"]}))
    for ident in (key["KeyId"], "alias/mvm", alias_arn):
        for fn, kw in calls:
            passes(fn, kmsKeyIdentifier=ident, **kw)
    # An explicit Deny wins; a key that does not exist is the operation's to refuse.
    iam.put_role_policy(RoleName="keyless", PolicyName="deny", PolicyDocument=policy(
        {"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}))
    refused("kms:Decrypt")
    passes(lam.run_microvm, imageIdentifier="nope", kmsKeyIdentifier="alias/missing")
    # The account's own key may hand over any of its keys.
    passes(client("lambda-microvms", KEY_A).run_microvm, imageIdentifier="nope", kmsKeyIdentifier=key["Arn"])
    for name in ("run", "key", "deny"):
        iam.delete_role_policy(RoleName="keyless", PolicyName=name)
    iam.delete_role(RoleName="keyless")
    print("kms keys: ok")


def tenants():
    """Another tenant's roles are not the caller's: not found, not assumable, not usable."""
    arn_a = roles.ensure_role(KEY_A, URL, "shared-name")
    iam_b = client("iam", KEY_B)
    expect_error("NoSuchEntity", 404, iam_b.get_role, RoleName="shared-name")
    assert all(r["Arn"] != arn_a for r in iam_b.list_roles()["Roles"])
    expect_error("AccessDenied", 403, client("sts", KEY_B).assume_role, RoleArn=arn_a, RoleSessionName="steal")
    lam_b = client("lambda-microvms", KEY_B)
    msg = expect_error("ValidationException", 400, lam_b.run_microvm, imageIdentifier="anything", executionRoleArn=arn_a)
    assert arn_a in msg and "create-role" in msg, msg
    # The caller's own role that does not exist: refused the same way.
    missing = f"arn:aws:iam::{KEY_B['account']}:role/missing"
    expect_error("ValidationException", 400, lam_b.run_microvm, imageIdentifier="anything", executionRoleArn=missing)
    expect_error("ValidationException", 400, lam_b.create_microvm_image, name="img", buildRoleArn=missing,
                 baseImageArn="arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal",
                 codeArtifact={"uri": "hearth://artifacts/" + "0" * 64})
    # A trust policy that names another account: not assumable by this one's root.
    iam_a = client("iam", KEY_A)
    iam_a.create_role(RoleName="theirs", AssumeRolePolicyDocument=trust(KEY_B["account"]))
    expect_error("AccessDenied", 403, client("sts", KEY_A).assume_role, RoleArn=f"arn:aws:iam::{A}:role/theirs", RoleSessionName="xx")
    # ensure_role reuses what exists.
    assert roles.ensure_role(KEY_A, URL, "shared-name") == arn_a
    print("tenants: ok")


def raw_query(body, service="iam"):
    """A signed query request with any body."""
    req = AWSRequest(method="POST", url=URL + "/", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    SigV4Auth(Credentials(KEY_A["accessKeyId"], KEY_A["secretAccessKey"]), service, "hh-local-1").add_auth(req)
    p = req.prepare()
    try:
        with urllib.request.urlopen(urllib.request.Request(p.url, data=body, method="POST", headers=dict(p.headers)), timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def hostile_queries():
    """Malformed query requests: 4xx in IAM's XML error shape, never a 5xx."""
    for body, code in [
        (b"Version=2010-05-08", "MissingAction"),
        (b"Action=CreateUser&Version=2010-05-08", "InvalidAction"),
        (b"Action=GetRole&Version=1999-01-01&RoleName=x", "InvalidParameterValue"),
        (b"Action=GetRole&Version=2010-05-08", "ValidationError"),
        (b"Action=GetRole&Version=2010-05-08&RoleName=" + b"x" * 65, "ValidationError"),
        (b"Action=CreateRole&Version=2010-05-08&RoleName=big&AssumeRolePolicyDocument=" + b"%20" * 3000 + b"x" * 3000, "MalformedPolicyDocument"),
        (b"\xff\xfe", "MalformedQueryString"),
        (b"&".join(b"a%d=1" % i for i in range(300)), "MalformedQueryString"),
    ]:
        status, text = raw_query(body)
        assert 400 <= status < 500 and f"<Code>{code}</Code>" in text, (body[:60], status, text)
    status, text = raw_query(b"Action=AssumeRole&Version=2011-06-15&RoleArn=arn:aws:iam::*:role/x&RoleSessionName=s", "sts")
    assert status == 400 and "<Code>ValidationError</Code>" in text, (status, text)
    print("hostile queries: ok")


def cli():
    """The AWS CLI, unchanged, against the daemon."""
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_A["accessKeyId"], AWS_SECRET_ACCESS_KEY=KEY_A["secretAccessKey"],
               AWS_DEFAULT_REGION="hh-local-1", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_PAGER="")

    def aws(*args, ok=True):
        r = subprocess.run([AWS, *args, "--endpoint-url", URL, "--output", "json"], env=env, capture_output=True, text=True, timeout=120)
        assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout, r.stderr)
        return json.loads(r.stdout) if ok and r.stdout.strip() else r.stderr

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(trust(A))
    made = aws("iam", "create-role", "--role-name", "cli-role", "--assume-role-policy-document", "file://" + f.name)
    assert made["Role"]["Arn"] == f"arn:aws:iam::{A}:role/cli-role", made
    assert aws("iam", "get-role", "--role-name", "cli-role")["Role"]["RoleId"] == made["Role"]["RoleId"]
    aws("iam", "put-role-policy", "--role-name", "cli-role", "--policy-name", "p", "--policy-document",
        policy({"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}))
    err = aws("iam", "put-role-policy", "--role-name", "cli-role", "--policy-name", "q", "--policy-document",
              policy({"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"}), ok=False)
    assert "MalformedPolicyDocument" in err, err
    assert aws("sts", "get-caller-identity")["Account"] == A
    creds = aws("sts", "assume-role", "--role-arn", made["Role"]["Arn"], "--role-session-name", "cli")["Credentials"]
    env.update(AWS_ACCESS_KEY_ID=creds["AccessKeyId"], AWS_SECRET_ACCESS_KEY=creds["SecretAccessKey"], AWS_SESSION_TOKEN=creds["SessionToken"])
    assert aws("sts", "get-caller-identity")["Arn"] == f"arn:aws:sts::{A}:assumed-role/cli-role/cli"
    assert "AccessDenied" in aws("iam", "list-roles", ok=False)
    print("cli: ok")


roles_and_policies()
sessions()
kms_keys()
tenants()
hostile_queries()
cli()
print("iam: ok")
