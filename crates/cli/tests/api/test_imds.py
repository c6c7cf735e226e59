"""Credentials inside microvms through IMDSv2 (over the agent channel), driven with boto3.
Run by crates/cli/tests/imds.rs; environment as test_api.py's (HEARTH_CTX holds the image:
imds_guest.py, which runs in the guest and prints what it saw).

A role made through the IAM API; a microvm with it as executionRoleArn and no egress at all
gets a token (IMDSv1 and forged tokens refused), the role's name and credentials in the
SDKs' shape, and those credentials are the role's session (STS GetCallerIdentity, from the
guest through the same address and from the host); a microvm without a role gets 404; the
relay refuses a Host naming another microvm's endpoint and the token-authenticated paths;
after a suspend and resume fresh credentials work. Phase `after-restart` (the daemon was
SIGKILLed and restarted): the reattached microvm still gets credentials, and after terminate
the microvm's credentials are refused while another's still work. A run claimed from the warm
pool gets credentials of its own.
"""
import json
import sys
import time

import boto3
import botocore

from test_api import CTX, KEY_A, URL, client, exec_in, pool_ready, wait_state, wait_version



def guest(mid, *args):
    r = exec_in(KEY_A, mid, "python3 /app/imds_guest.py " + " ".join(args))
    assert r["exitCode"] == 0, r
    return json.loads(r["stdout"].strip().splitlines()[-1])


def sts_with(creds):
    return boto3.client(
        "sts", endpoint_url=URL, region_name="hh-local-1",
        aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["Token"], config=botocore.config.Config(retries={"max_attempts": 1}),
    )


def main():
    a = client(KEY_A)
    iam = boto3.client("iam", endpoint_url=URL, region_name="us-east-1",
                       aws_access_key_id=KEY_A["accessKeyId"], aws_secret_access_key=KEY_A["secretAccessKey"])
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="imds-app", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    role_arn = role["Arn"]

    a.create_microvm_image(name="imds", baseImageArn="arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:debian-bookworm",
                           buildRoleArn=role_arn, codeArtifact={"uri": "file://" + CTX})
    v = wait_version(a, "imds", "1", timeout=900)
    assert v["state"] == "SUCCESSFUL", v

    # Egress none: no network device at all; the metadata service still answers.
    with_role = a.run_microvm(imageIdentifier="imds", executionRoleArn=role_arn, egressNetworkConnectors=[])["microvmId"]
    # With a network device (default egress) the address is still the guest's own.
    without = a.run_microvm(imageIdentifier="imds")["microvmId"]
    wait_state(a, with_role, "RUNNING", 300)
    wait_state(a, without, "RUNNING", 300)

    seen = guest(with_role, "check")
    assert seen["env"] == {"AWS_REGION": "hh-local-1", "AWS_DEFAULT_REGION": "hh-local-1",
                           "AWS_ENDPOINT_URL_STS": "http://169.254.169.254",
                           "AWS_ENDPOINT_URL_SECRETS_MANAGER": "http://169.254.169.254"}, seen["env"]
    assert (seen["v1"], seen["forged"], seen["bad_ttl"]) == (401, 401, 400), seen
    assert seen["instance_id"] == with_role and seen["region"] == "hh-local-1", seen
    assert seen["identity"]["accountId"] == KEY_A["account"] and seen["identity"]["region"] == "hh-local-1", seen
    assert seen["role"] == "imds-app" and seen["wrong_role"] == 404, seen
    creds = seen["creds"]
    assert creds["Code"] == "Success" and creds["Type"] == "AWS-HMAC" and creds["Expiration"].endswith("Z"), creds
    session_arn = f"arn:aws:sts::{KEY_A['account']}:assumed-role/imds-app/hearth-{with_role}"
    status, text = seen["sts"]
    assert status == 200 and session_arn in text, seen["sts"]
    assert sts_with(creds).get_caller_identity()["Arn"] == session_arn
    # A role the microvm's role may assume: a session chained from the microvm's
    # credentials is the microvm's too (revoked at its terminate, below).
    iam.put_role_policy(RoleName="imds-app", PolicyName="chain", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}))
    iam.create_role(RoleName="imds-chained", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": role_arn}, "Action": "sts:AssumeRole"}]}))
    chained = sts_with(creds).assume_role(RoleArn=role_arn.replace("imds-app", "imds-chained"), RoleSessionName="chained")["Credentials"]
    chained = {"AccessKeyId": chained["AccessKeyId"], "SecretAccessKey": chained["SecretAccessKey"], "Token": chained["SessionToken"]}
    assert sts_with(chained).get_caller_identity()["Arn"].endswith(":assumed-role/imds-chained/chained")

    assert guest(without, "check")["role_status"] == 404

    # A pooled claim: the VM was started before it had a role; its credentials are the
    # claiming run's.
    wait(lambda: pool_ready("imds"), "the pool to fill")
    pooled = a.run_microvm(imageIdentifier="imds", executionRoleArn=role_arn, egressNetworkConnectors=[])["microvmId"]
    wait_state(a, pooled, "RUNNING", 300)
    claimed = guest(pooled, "check")
    assert claimed["instance_id"] == pooled, claimed
    assert claimed["sts"][0] == 200 and f"assumed-role/imds-app/hearth-{pooled}" in claimed["sts"][1], claimed["sts"]

    # The relay is no way to another microvm: its endpoint host, its endpoint path, a shell.
    other_host = a.get_microvm(microvmIdentifier=without)["endpoint"]
    for host, path in [(other_host, "/"), ("169.254.169.254", f"/microvms/{without}/"), ("169.254.169.254", f"/shell/{without}")]:
        r = guest(with_role, "refused", host, path)
        assert r["status"] == 400, (host, path, r)

    # Suspend and resume: fresh credentials, which work.
    a.suspend_microvm(microvmIdentifier=with_role)
    wait_state(a, with_role, "SUSPENDED", 300)
    a.resume_microvm(microvmIdentifier=with_role)
    wait_state(a, with_role, "RUNNING", 300)
    again = guest(with_role, "check")
    assert again["creds"]["AccessKeyId"] != creds["AccessKeyId"], "fresh credentials after a resume"
    assert again["sts"][0] == 200 and session_arn in again["sts"][1], again["sts"]

    print(json.dumps({"with_role": with_role, "without": without, "pooled": pooled, "creds": [creds, again["creds"], chained],
                      "pooled_creds": claimed["creds"]}))
    print("imds: ok")


def after_restart(left):
    """The daemon was SIGKILLed and started again: the reattached microvm's relay serves
    fresh credentials; terminate revokes them all, and only that microvm's."""
    a = client(KEY_A)
    with_role, without, pooled, old = left["with_role"], left["without"], left["pooled"], left["creds"]
    session_arn = f"arn:aws:sts::{KEY_A['account']}:assumed-role/imds-app/hearth-{with_role}"
    seen = guest(with_role, "check")
    assert seen["sts"][0] == 200 and session_arn in seen["sts"][1], seen["sts"]


    # Terminate: every credential of the microvm (and one chained from them) is refused
    # from then on; another microvm's still work.
    a.terminate_microvm(microvmIdentifier=with_role)
    wait_state(a, with_role, "TERMINATED", 120)
    for c in old + [seen["creds"]]:
        try:
            sts_with(c).get_caller_identity()
            raise AssertionError("credentials of a terminated microvm still work")
        except botocore.exceptions.ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response
    assert sts_with(left["pooled_creds"]).get_caller_identity()["Arn"].endswith(f"/hearth-{pooled}")
    for m in (without, pooled):
        a.terminate_microvm(microvmIdentifier=m)
    print("after-restart: ok")


def wait(fn, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["after-restart"]:
        after_restart(json.loads(sys.argv[2]))
    else:
        main()
