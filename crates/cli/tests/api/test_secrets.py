"""Secrets Manager and KMS of a running `hearth serve`, through boto3, and encryption at rest
of a suspended microvm under its kmsKeyIdentifier.

And encryption at rest of a keyed image's template: the image at HEARTH_CTX starts an app
that holds HEARTH_TMPL_MARKER in its memory (built from two halves, so the context's files
do not hold it); the keyed image's files must not hold it, the unkeyed one's template RAM
does (the control), and its microvms still see it. With the argument `after-restart` (the
daemon was SIGKILLed and started again), the microvm HEARTH_KEYED_MICROVM left running is
checked, another is launched, and deleting the version removes the decrypted copy.

Run by crates/cli/tests/secrets.rs. Environment: HEARTH_URL, HEARTH_KEY_A (may name
file:// artifacts beneath HEARTH_CTX), HEARTH_KEY_B (another tenant), HEARTH_STATE (the
daemon's state directory), HEARTH_SECRET (the value to store: it must appear nowhere on
disk in plain text).
"""
import glob
import sys
import base64
import json
import os
import time
import urllib.request

import boto3
import botocore
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

URL = os.environ["HEARTH_URL"]
KEY_A = json.loads(os.environ["HEARTH_KEY_A"])
KEY_B = json.loads(os.environ["HEARTH_KEY_B"])
STATE = os.environ["HEARTH_STATE"]
CTX = os.environ["HEARTH_CTX"]
SECRET = os.environ["HEARTH_SECRET"]
TMPL_MARKER = os.environ["HEARTH_TMPL_MARKER"].encode()
MINIMAL = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"
CFG = Config(retries={"max_attempts": 1, "mode": "standard"})


def client(service, key):
    return boto3.client(service, endpoint_url=URL, region_name="hh-local-1", config=CFG,
                        aws_access_key_id=key["accessKeyId"], aws_secret_access_key=key["secretAccessKey"])


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
        assert got[0] == code and 400 <= got[1] < 500, f"expected {code} 4xx, got {got}: {e}"
        assert SECRET not in str(e), "a value in an error message"
        return e.response
    raise AssertionError(f"expected {code}, the call succeeded")


def raw(target, body, service="secretsmanager"):
    """A signed JSON 1.1 request with any target and body."""
    req = AWSRequest(method="POST", url=URL + "/", data=body,
                     headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target})
    SigV4Auth(Credentials(KEY_A["accessKeyId"], KEY_A["secretAccessKey"]), service, "hh-local-1").add_auth(req)
    p = req.prepare()
    try:
        with urllib.request.urlopen(urllib.request.Request(p.url, data=body, method="POST", headers=dict(p.headers)), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def files_under(root, skip=()):
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                yield p


def contains(path, needle):
    with open(path, "rb") as f:
        tail = b""
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                return False
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle):]


def kms_part(kms, kms_b):
    key = kms.create_key(Description="app key")["KeyMetadata"]
    assert key["KeySpec"] == "SYMMETRIC_DEFAULT" and key["KeyState"] == "Enabled" and key["KeyManager"] == "CUSTOMER", key
    assert kms.describe_key(KeyId=key["Arn"])["KeyMetadata"]["KeyId"] == key["KeyId"]
    kms.create_alias(AliasName="alias/app", TargetKeyId=key["KeyId"])
    assert kms.describe_key(KeyId="alias/app")["KeyMetadata"]["Arn"] == key["Arn"]
    expect_error("AlreadyExistsException", kms.create_alias, AliasName="alias/app", TargetKeyId=key["KeyId"])
    expect_error("InvalidAliasNameException", kms.create_alias, AliasName="alias/aws/mine", TargetKeyId=key["KeyId"])
    expect_error("InvalidAliasNameException", kms.create_alias, AliasName="app", TargetKeyId=key["KeyId"])
    expect_error("UnsupportedOperationException", kms.create_key, KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    expect_error("NotFoundException", kms.describe_key, KeyId="alias/none")
    # Another tenant does not see the key, by id or ARN.
    expect_error("NotFoundException", kms_b.describe_key, KeyId=key["Arn"])
    expect_error("NotFoundException", kms_b.describe_key, KeyId=key["KeyId"])
    assert [k["KeyId"] for k in kms.list_keys()["Keys"]] == [key["KeyId"]]
    assert [a["AliasName"] for a in kms.list_aliases()["Aliases"]] == ["alias/app"]
    ct = kms.encrypt(KeyId="alias/app", Plaintext=b"hello", EncryptionContext={"a": "b"})["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=ct, EncryptionContext={"a": "b"})["Plaintext"] == b"hello"
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=ct, EncryptionContext={"a": "c"})
    expect_error("NotFoundException", kms_b.decrypt, CiphertextBlob=ct, EncryptionContext={"a": "b"})
    dk = kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")
    assert len(dk["Plaintext"]) == 32 and kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    return key


def secrets_part(sm, sm_b):
    created = sm.create_secret(Name="prod/api-key", SecretString=SECRET, KmsKeyId="alias/app", Description="d",
                               Tags=[{"Key": "team", "Value": "x"}])
    arn, v1 = created["ARN"], created["VersionId"]
    assert arn.startswith("arn:aws:secretsmanager:hh-local-1:" + KEY_A["account"] + ":secret:prod/api-key-"), arn
    for ident in ("prod/api-key", arn, arn[:-7]):
        assert sm.get_secret_value(SecretId=ident)["SecretString"] == SECRET
    expect_error("ResourceExistsException", sm.create_secret, Name="prod/api-key", SecretString="x")
    v2 = sm.put_secret_value(SecretId=arn, SecretString=SECRET + "-2")
    assert v2["VersionStages"] == ["AWSCURRENT"], v2
    assert sm.get_secret_value(SecretId=arn)["SecretString"] == SECRET + "-2"
    prev = sm.get_secret_value(SecretId=arn, VersionStage="AWSPREVIOUS")
    assert prev["SecretString"] == SECRET and prev["VersionId"] == v1
    d = sm.describe_secret(SecretId=arn)
    assert d["VersionIdsToStages"] == {v1: ["AWSPREVIOUS"], v2["VersionId"]: ["AWSCURRENT"]}, d
    assert d["KmsKeyId"] == "alias/app" and d["Tags"] == [{"Key": "team", "Value": "x"}] and "DeletedDate" not in d
    sm.put_secret_value(SecretId=arn, SecretString="third")
    d = sm.describe_secret(SecretId=arn)
    assert v1 not in d["VersionIdsToStages"] and d["VersionIdsToStages"][v2["VersionId"]] == ["AWSPREVIOUS"], d
    sm.update_secret(SecretId=arn, Description="new", SecretString=SECRET)
    assert sm.describe_secret(SecretId=arn)["Description"] == "new"
    sm.tag_resource(SecretId=arn, Tags=[{"Key": "env", "Value": "prod"}])
    sm.untag_resource(SecretId=arn, TagKeys=["team"])
    assert sm.describe_secret(SecretId=arn)["Tags"] == [{"Key": "env", "Value": "prod"}]
    # Binary values, under the default key (made on first use).
    sm.create_secret(Name="bin", SecretBinary=b"\x00\x01\xff")
    assert sm.get_secret_value(SecretId="bin")["SecretBinary"] == b"\x00\x01\xff"
    assert "KmsKeyId" not in sm.describe_secret(SecretId="bin")
    sm.create_secret(Name="third")
    # Pages, no values in lists.
    names, token = [], None
    while True:
        page = sm.list_secrets(MaxResults=1, **({"NextToken": token} if token else {}))
        assert all("SecretString" not in s for s in page["SecretList"])
        names += [s["Name"] for s in page["SecretList"]]
        token = page.get("NextToken")
        if not token:
            break
    assert sorted(names) == ["bin", "prod/api-key", "third"], names
    # Refusals: 4xx with the service's codes.
    expect_error("InvalidParameterException", sm.create_secret, Name="big", SecretString="x" * 65537)
    expect_error("InvalidParameterException", sm.put_secret_value, SecretId=arn, SecretBinary=b"x" * 65537)
    expect_error("InvalidParameterException", sm.create_secret, Name="bad name", SecretString="x")
    expect_error("InvalidParameterException", sm.create_secret, Name="x" * 513, SecretString="x")
    expect_error("ResourceNotFoundException", sm.create_secret, Name="k", SecretString="x", KmsKeyId="alias/none")
    expect_error("ResourceNotFoundException", sm_b.get_secret_value, SecretId=arn)
    expect_error("ResourceNotFoundException", sm_b.describe_secret, SecretId=arn)
    expect_error("ResourceNotFoundException", sm_b.put_secret_value, SecretId=arn, SecretString="stolen")
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId="nope")
    expect_error("InvalidParameterException", sm.delete_secret, SecretId="bin", RecoveryWindowInDays=3)
    expect_error("InvalidParameterException", sm.delete_secret, SecretId="bin", RecoveryWindowInDays=7, ForceDeleteWithoutRecovery=True)
    status, body = raw("secretsmanager.NoSuchOp", b"{}")
    assert (status, body["__type"]) == (400, "UnknownOperationException"), (status, body)
    status, body = raw("secretsmanager.GetSecretValue", b"{not json")
    assert (status, body["__type"]) == (400, "SerializationException"), (status, body)
    status, body = raw("secretsmanager.GetSecretValue", b'{"SecretId": 7}')
    assert (status, body["__type"]) == (400, "InvalidParameterException"), (status, body)
    status, body = raw("TrentService.CreateKey", b'{"KeyUsage": []}', service="kms")
    assert (status, body["__type"]) == (400, "ValidationException"), (status, body)
    # Deletion with a recovery window; restore; deletion without.
    deleted = sm.delete_secret(SecretId="bin", RecoveryWindowInDays=7)
    assert deleted["DeletionDate"].timestamp() - time.time() > 6 * 86400, deleted
    expect_error("InvalidRequestException", sm.get_secret_value, SecretId="bin")
    assert "DeletedDate" in sm.describe_secret(SecretId="bin")
    assert "bin" not in [s["Name"] for s in sm.list_secrets()["SecretList"]]
    assert "bin" in [s["Name"] for s in sm.list_secrets(IncludePlannedDeletion=True)["SecretList"]]
    expect_error("InvalidRequestException", sm.create_secret, Name="bin", SecretString="x")
    sm.restore_secret(SecretId="bin")
    assert sm.get_secret_value(SecretId="bin")["SecretBinary"] == b"\x00\x01\xff"
    sm.delete_secret(SecretId="third", ForceDeleteWithoutRecovery=True)
    expect_error("ResourceNotFoundException", sm.describe_secret, SecretId="third")
    return arn


def no_plain_value_in_state():
    """The daemon's database (and its WAL) hold the values only encrypted."""
    db = [p for p in files_under(STATE, skip=("images", "run", "microvms", "artifacts"))]
    assert any("wal" in p or p.endswith(".db") or "sqlite" in p for p in db) or db, db
    for p in db:
        assert not contains(p, SECRET.encode()), f"{p} holds a secret's value in plain text"


def wait_state(a, mid, want, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = a.get_microvm(microvmIdentifier=mid)
        if m["state"] == want:
            return m
        time.sleep(0.5)
    raise AssertionError(f"{mid} never became {want}: {m}")


def exec_in(mid, shell):
    body = json.dumps({"shell": shell}).encode()
    req = AWSRequest(method="POST", url=f"{URL}/hearth/v1/microvms/{mid}/exec", data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(KEY_A["accessKeyId"], KEY_A["secretAccessKey"]), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    with urllib.request.urlopen(urllib.request.Request(p.url, data=body, method="POST", headers=dict(p.headers)), timeout=300) as r:
        return json.loads(r.read())


def suspended_files(mid):
    # `memory` is a link to the image's template RAM: the image's, not the microvm's.
    return [p for p in files_under(os.path.join(STATE, "microvms", mid)) if os.path.basename(p) != "memory"]


def microvm_part(key):
    a = boto3.client("lambda-microvms", endpoint_url=URL, region_name="us-east-1", config=CFG,
                     aws_access_key_id=KEY_A["accessKeyId"], aws_secret_access_key=KEY_A["secretAccessKey"])
    expect_error("ValidationException", a.create_microvm_image, name="badkey", baseImageArn=MINIMAL, buildRoleArn=ROLE,
                 codeArtifact={"uri": "file://" + CTX}, kmsKeyIdentifier="alias/none")
    a.create_microvm_image(name="sealed", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX})
    deadline = time.time() + 900
    while a.get_microvm_image_version(imageIdentifier="sealed", imageVersion="1")["state"] != "SUCCESSFUL":
        assert time.time() < deadline, "the image never built"
        time.sleep(1)
    expect_error("ValidationException", a.run_microvm, imageIdentifier="sealed", kmsKeyIdentifier="alias/none")
    sealed = a.run_microvm(imageIdentifier="sealed", kmsKeyIdentifier="alias/app")["microvmId"]
    plain = a.run_microvm(imageIdentifier="sealed")["microvmId"]
    marker = "MARK" + SECRET[::-1]
    for mid in (sealed, plain):
        wait_state(a, mid, "RUNNING")
        # On disk, and in memory (a process holds it in its environment and arguments).
        out = exec_in(mid, f"echo {marker} > /root/marker; sync; (sh -c 'sleep 100000' {marker} >/dev/null 2>&1 &); echo ok")
        assert out["stdout"].strip() == "ok", out
    # The keyless one first: the first suspend of an image's microvms also checksums its
    # template RAM once (memory.json), which would count against the encrypted one.
    t0 = time.time()
    a.suspend_microvm(microvmIdentifier=plain)
    t_plain = time.time() - t0
    t0 = time.time()
    a.suspend_microvm(microvmIdentifier=sealed)
    t_sealed = time.time() - t0
    names = [os.path.basename(p) for p in suspended_files(sealed)]
    assert "state.enc" in names and "disk.qcow2.enc" in names and "state" not in names, names
    leaked = [p for p in suspended_files(sealed) if contains(p, marker.encode())]
    assert not leaked, f"the marker is readable in {leaked}"
    # The check can fail: without a key the same marker is there in plain text.
    assert any(contains(p, marker.encode()) for p in suspended_files(plain)), "control: the marker should be in the plain files"
    t0 = time.time()
    a.resume_microvm(microvmIdentifier=plain)
    t_resume_plain = time.time() - t0
    t0 = time.time()
    a.resume_microvm(microvmIdentifier=sealed)
    t_resume_sealed = time.time() - t0
    assert exec_in(sealed, "cat /root/marker")["stdout"].strip() == marker
    assert not any(os.path.basename(p).endswith(".enc") for p in suspended_files(sealed))
    print(f"timing: suspend {t_sealed:.2f}s encrypted / {t_plain:.2f}s plain; "
          f"resume {t_resume_sealed:.2f}s encrypted / {t_resume_plain:.2f}s plain")
    for mid in (sealed, plain):
        a.terminate_microvm(microvmIdentifier=mid)


def lambda_client():
    return boto3.client("lambda-microvms", endpoint_url=URL, region_name="us-east-1", config=CFG,
                        aws_access_key_id=KEY_A["accessKeyId"], aws_secret_access_key=KEY_A["secretAccessKey"])


def wait_built(a, name, version="1"):
    deadline = time.time() + 900
    while True:
        v = a.get_microvm_image_version(imageIdentifier=name, imageVersion=version)
        if v["state"] == "SUCCESSFUL":
            return v
        assert v["state"] != "FAILED" and time.time() < deadline, f"{name} did not build: {v}"
        time.sleep(1)


def plain_views():
    """Decrypted template RAM files (in /dev/shm) that hold the marker."""
    found = []
    for p in glob.glob("/dev/shm/hearth-templates-*/*/memory"):
        try:
            if contains(p, TMPL_MARKER):
                found.append(p)
        except OSError:
            pass
    return found


def sees_marker(mid):
    out = exec_in(mid, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    return TMPL_MARKER.decode() in out["stdout"]


def files_holding_marker(*skip):
    """Files under the state directory that hold the template marker, but for those of the
    unkeyed control image and its microvms."""
    dirs = [os.path.join(STATE, "images", KEY_A["account"], "sealed")] + [os.path.join(STATE, "microvms", m) for m in skip]
    return [p for p in files_under(STATE) if not any(p.startswith(d + os.sep) for d in dirs) and contains(p, TMPL_MARKER)]


def allocated(d):
    return sum(os.stat(p).st_blocks * 512 for p in files_under(d) if os.path.basename(p) != "memory")


def template_part():
    """A keyed image's template is encrypted at rest; its microvms launch, suspend and
    resume from a copy decrypted into memory. Returns the microvm left running."""
    a = lambda_client()
    a.create_microvm_image(name="keyed", baseImageArn=MINIMAL, buildRoleArn=ROLE,
                           codeArtifact={"uri": "file://" + CTX}, kmsKeyIdentifier="alias/app")
    wait_built(a, "keyed")
    snap = os.path.join(STATE, "images", KEY_A["account"], "keyed", "1", "snapshot")
    names = sorted(os.listdir(snap))
    assert "memory.enc" in names and "state.enc" in names and "memory" not in names and "state" not in names, names
    # The control: the unkeyed image built from the same context holds the marker in RAM.
    control = os.path.join(STATE, "images", KEY_A["account"], "sealed", "1", "snapshot", "memory")
    assert contains(control, TMPL_MARKER), "control: the unkeyed template's RAM should hold the marker"
    leaked = files_holding_marker()
    assert not leaked, f"the keyed template's marker is readable in {leaked}"
    assert not plain_views(), "decrypted before its first use"
    k1 = a.run_microvm(imageIdentifier="keyed")["microvmId"]
    u1 = a.run_microvm(imageIdentifier="sealed")["microvmId"]
    for mid in (k1, u1):
        wait_state(a, mid, "RUNNING")
        assert sees_marker(mid), f"{mid} does not see the app's marker"
    assert plain_views(), "the decrypted copy is in /dev/shm"
    took = {}
    for mid in (u1, k1):
        t0 = time.time()
        a.suspend_microvm(microvmIdentifier=mid)
        took[("suspend", mid)] = time.time() - t0
    leaked = files_holding_marker(u1)
    assert not leaked, f"the keyed microvm's marker is readable in {leaked}"
    kdir, udir = (os.path.join(STATE, "microvms", m, "suspended") for m in (k1, u1))
    sizes = (allocated(kdir) / 2**20, allocated(udir) / 2**20)
    for mid in (k1, u1):
        t0 = time.time()
        a.resume_microvm(microvmIdentifier=mid)
        took[("resume", mid)] = time.time() - t0
        assert sees_marker(mid), f"{mid} lost the marker over suspend and resume"
    print(f"timing: keyed image's clone / unkeyed image's clone: suspended size {sizes[0]:.1f} / {sizes[1]:.1f} MiB; "
          f"suspend {took[('suspend', k1)]:.2f} / {took[('suspend', u1)]:.2f} s; "
          f"resume {took[('resume', k1)]:.2f} / {took[('resume', u1)]:.2f} s")
    a.terminate_microvm(microvmIdentifier=u1)
    return k1


def after_restart():
    a = lambda_client()
    k1 = os.environ["HEARTH_KEYED_MICROVM"]
    assert not plain_views(), "a stale decrypted copy survived the restart"
    wait_state(a, k1, "RUNNING")
    assert sees_marker(k1), "the reattached microvm lost the marker"
    k2 = a.run_microvm(imageIdentifier="keyed")["microvmId"]
    wait_state(a, k2, "RUNNING")
    assert sees_marker(k2) and plain_views()
    for mid in (k1, k2):
        a.terminate_microvm(microvmIdentifier=mid)
    deadline = time.time() + 120
    while True:
        try:
            a.delete_microvm_image_version(imageIdentifier="keyed", imageVersion="1")
            break
        except botocore.exceptions.ClientError as e:
            # A microvm still being terminated: a moment.
            assert e.response["Error"]["Code"] == "ConflictException" and time.time() < deadline, e
            time.sleep(1)
    assert not plain_views(), "the decrypted copy outlived its version"
    # Nor the copy's directory, whatever it holds.
    assert not glob.glob("/dev/shm/hearth-templates-*/*.keyed.*"), "a view's directory outlived its version"
    print("after-restart: ok")


def main():
    if sys.argv[1:] == ["after-restart"]:
        after_restart()
        return
    kms, kms_b = client("kms", KEY_A), client("kms", KEY_B)
    sm, sm_b = client("secretsmanager", KEY_A), client("secretsmanager", KEY_B)
    key = kms_part(kms, kms_b)
    secrets_part(sm, sm_b)
    no_plain_value_in_state()
    microvm_part(key)
    print(f"keyed-microvm: {template_part()}")
    print("secrets: ok")


if __name__ == "__main__":
    main()
