"""The agent-sandbox reference flow (issue 19): an agent's secret stays out of the
microvm except by reference. A KMS key and a secret under it; a role allowed to read it
and one that is not; an image whose app reads the secret at `/run` by the ARN passed in
`runHookPayload`, with boto3 and nothing but its role's credentials (IMDSv2 over the agent
channel, no network at all). Then the value is looked for where it must not be: the image,
the suspended microvm's files (encrypted under the key), the guest's environment, the
daemon's database and log.

The image's build runs with its build role (the reader): its RUN step and its `/validate`
hook (flow_build.py) read a build secret through IMDSv2 and are refused one the role may
not read; the credentials they used are refused once the build is done; a build whose
role may not read the build secret fails with AccessDenied.

Run by crates/cli/tests/secrets_flow.rs with HEARTH_URL, HEARTH_KEY_A, HEARTH_CTX (the
image's context, boto3 included), HEARTH_STATE and HEARTH_DAEMON_LOG.
"""
import glob
import hashlib
import json
import os
import secrets
import time

import boto3
import botocore

from test_api import KEY_A, URL, client, exec_in, wait_state, wait_version

CTX = os.environ["HEARTH_CTX"]
STATE = os.environ["HEARTH_STATE"]
LOG = os.environ["HEARTH_DAEMON_LOG"]
DEBIAN = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:debian-bookworm"


def aws(name):
    return boto3.client(name, endpoint_url=URL, region_name="hh-local-1",
                        aws_access_key_id=KEY_A["accessKeyId"], aws_secret_access_key=KEY_A["secretAccessKey"])


def files_holding(root, needle):
    """Every file under `root` whose bytes contain `needle` (sparse files read whole)."""
    found = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            tail = b""
            with open(p, "rb") as f:
                while True:
                    chunk = f.read(8 << 20)
                    if not chunk:
                        break
                    if needle in tail + chunk:
                        found.append(p)
                        break
                    tail = chunk[-len(needle):]
    return found


def sts_with(creds):
    return boto3.client(
        "sts", endpoint_url=URL, region_name="hh-local-1",
        aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["Token"], config=botocore.config.Config(retries={"max_attempts": 1}),
    )


def check_build_proof(p, build_want, what):
    """What flow_build.py saw in the builder: the build secret read, the forbidden one
    refused, as a session of the build role issued to the build, whose credentials are
    dead now that the build is done."""
    assert p["build_secret"] == build_want, (what, p)
    assert p["forbidden"] == "error:AccessDeniedException", (what, p)
    assert "assumed-role/agent-reader/hearth-build-" in p["arn"], (what, p["arn"])
    ident = p["identity"]
    assert ident["instanceId"].startswith("build-") and ident["imageId"].endswith(":microvm-image:agent"), (what, ident)
    assert ident["accountId"] == KEY_A["account"], (what, ident)
    try:
        sts_with(p["creds"]).get_caller_identity()
        raise AssertionError(f"the {what}'s build credentials still work after the build")
    except botocore.exceptions.ClientError as e:
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response
        assert e.response["Error"]["Code"] == "InvalidClientTokenId", e.response


def app_result(mid):
    out = exec_in(KEY_A, mid, "python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/secret').read().decode())\"")
    return out["stdout"].strip()


def main():
    a = client(KEY_A)
    kms, sm, iam = aws("kms"), aws("secretsmanager"), aws("iam")
    value = "sk-agent-" + secrets.token_hex(24)
    needle = value.encode()

    key = kms.create_key(Description="the agent's sandboxes")["KeyMetadata"]
    kms.create_alias(AliasName="alias/agent", TargetKeyId=key["KeyId"])
    arn = sm.create_secret(Name="agent/model-api-key", SecretString=value, KmsKeyId="alias/agent")["ARN"]
    # What the build reads with its role, and one secret its role may not read.
    build_value = "build-" + secrets.token_hex(16)
    build_arn = sm.create_secret(Name="agent/build-token", SecretString=build_value, KmsKeyId="alias/agent")["ARN"]
    sm.create_secret(Name="agent/not-for-builds", SecretString="x", KmsKeyId="alias/agent")

    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    reader = iam.create_role(RoleName="agent-reader", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    iam.put_role_policy(RoleName="agent-reader", PolicyName="read-the-key", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": [arn, build_arn]},
            {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": key["Arn"]}]}))
    other = iam.create_role(RoleName="agent-other", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    iam.put_role_policy(RoleName="agent-other", PolicyName="nothing-secret", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}]}))

    hooks = {"port": 8080, "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 60, "suspend": "ENABLED",
                                            "suspendTimeoutInSeconds": 60, "resume": "ENABLED", "resumeTimeoutInSeconds": 60},
             "microvmImageHooks": {"validate": "ENABLED", "validateTimeoutInSeconds": 300}}
    a.create_microvm_image(name="agent", baseImageArn=DEBIAN, buildRoleArn=reader, codeArtifact={"uri": "file://" + CTX}, hooks=hooks)
    v = wait_version(a, "agent", "1", timeout=900)
    assert v["state"] == "SUCCESSFUL", v
    # The same image built with a role that may not read the build secret: its RUN step
    # and its /validate are refused and the build fails.
    a.create_microvm_image(name="agent-denied", baseImageArn=DEBIAN, buildRoleArn=other, codeArtifact={"uri": "file://" + CTX}, hooks=hooks)

    # No egress at all: the metadata service and Secrets Manager come over the agent channel.
    run = dict(imageIdentifier="agent", egressNetworkConnectors=[], runHookPayload=arn)
    m1 = a.run_microvm(executionRoleArn=reader, kmsKeyIdentifier=key["Arn"], **run)["microvmId"]
    m2 = a.run_microvm(executionRoleArn=other, **run)["microvmId"]
    try:
        for m in (m1, m2):
            assert wait_state(a, m, "RUNNING", timeout=300)["state"] == "RUNNING"
        want = "sha256:" + hashlib.sha256(needle).hexdigest()
        deadline = time.time() + 120
        while app_result(m1) == "none" and time.time() < deadline:
            time.sleep(1)
        assert app_result(m1) == want, app_result(m1)
        assert app_result(m2) == "error:AccessDeniedException", app_result(m2)
        print("the role that may read it did; the other got AccessDenied", flush=True)

        # The build ran with the build role (RUN step and /validate), and what it was
        # given no longer works.
        build_want = "sha256:" + hashlib.sha256(build_value.encode()).hexdigest()
        run_step = json.loads(exec_in(KEY_A, m1, "cat /app/build-proof.json")["stdout"])
        check_build_proof(run_step, build_want, "RUN step")
        validated = json.loads(exec_in(KEY_A, m1, "python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/build').read().decode())\"")["stdout"])
        check_build_proof(validated, build_want, "/validate hook")
        print("the build read its secret with the build role; its credentials are refused after it", flush=True)

        # Not in the guest's environment (any process's). (The value itself is never sent
        # into the guest by the test: the daemon's log is checked below.)
        env = exec_in(KEY_A, m1, "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; env")["stdout"]
        assert "AWS_ENDPOINT_URL_SECRETS_MANAGER" in env and value not in env, env[:2000]

        # Suspended: memory, devices and disk are under the key; the value is nowhere in them.
        a.suspend_microvm(microvmIdentifier=m1)
        assert wait_state(a, m1, "SUSPENDED", timeout=300)["state"] == "SUSPENDED"
        microvms = os.path.join(STATE, "microvms", m1)
        assert os.path.isdir(microvms), os.listdir(os.path.join(STATE, "microvms"))
        assert files_holding(microvms, needle) == [], files_holding(microvms, needle)
        # Nor in the image (its versions, templates and layers), the database, the log.
        for root in (os.path.join(STATE, "images"), STATE):
            hits = [p for p in files_holding(root, needle) if not p.startswith(os.path.join(STATE, "run"))]
            assert hits == [], hits
        with open(LOG, "rb") as f:
            assert needle not in f.read(), "the daemon's log holds the secret"
        # Resumed, the app still holds it (its memory came back whole).
        a.resume_microvm(microvmIdentifier=m1)
        assert wait_state(a, m1, "RUNNING", timeout=300)["state"] == "RUNNING"
        assert app_result(m1) == want
        # Its /suspend and /resume hooks ran with the execution role.
        seen = json.loads(exec_in(KEY_A, m1, "python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/hooks').read().decode())\"")["stdout"])
        for hook in ("/suspend", "/resume"):
            assert seen.get(hook, "").endswith(f":assumed-role/agent-reader/hearth-{m1}"), seen
        print("absent from the image, the suspended files, the environment, the store and the log", flush=True)
        # The control: the same microvm without a key keeps the value in its suspended
        # memory in plain text, so the search above can find what it looks for.
        m3 = a.run_microvm(executionRoleArn=reader, **run)["microvmId"]
        assert wait_state(a, m3, "RUNNING", timeout=300)["state"] == "RUNNING"
        assert app_result(m3) == want
        a.suspend_microvm(microvmIdentifier=m3)
        assert wait_state(a, m3, "SUSPENDED", timeout=300)["state"] == "SUSPENDED"
        assert files_holding(os.path.join(STATE, "microvms", m3), needle), "the control found nothing"
        a.terminate_microvm(microvmIdentifier=m3)
        assert wait_state(a, m3, "TERMINATED", timeout=300)["state"] == "TERMINATED"
    finally:
        for m in (m1, m2):
            try:
                a.terminate_microvm(microvmIdentifier=m)
            except Exception:  # noqa: BLE001 - best effort; the Rust side kills what is left
                pass
    denied = wait_version(a, "agent-denied", "1", timeout=900)
    assert denied["state"] == "FAILED" and "AccessDeniedException" in denied.get("stateReason", ""), denied
    # Its RUN step ran again under its own role (the build role is part of the layers'
    # cache key: nothing the reader role fetched is reused) and was refused the secret.
    logs = glob.glob(os.path.join(STATE, "images", "*", "agent-denied", "1", "build.log"))
    assert logs, "the denied build's log"
    with open(logs[0], encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "[cached]" not in log, log[-2000:]
    assert '"build_secret": "error:AccessDeniedException"' in log and "assumed-role/agent-other/" in log, log[-2000:]
    print("a build whose role may not read the build secret failed", flush=True)
    # Every file under the state directory, running microvms' included, once they are gone.
    assert files_holding(STATE, needle) == []
    print("flow: ok", flush=True)


if __name__ == "__main__":
    main()
