"""Warm pools behind RunMicrovm, through boto3: a claim is a fresh launch to the guest and
to the API. Run by crates/cli/tests/pools.rs (argv[1] is the phase); environment:
HEARTH_URL, HEARTH_KEY_A (may name file:// artifacts beneath HEARTH_CTX), HEARTH_STATE.

- `claims`: the first run of a version makes its pool; the next run is served from it (its
  id is the pooled QEMU's, seen on the host before the call), with its own hostname,
  machine-id and random bytes, its run hook called with its payload only, the hostname a fresh launch has, the egress its
  run asked for, and a start time from the claim. The tag `hearth:pool-size` 0 retires the
  pool (its QEMU goes); 1 brings it back. Prints the pooled id it leaves.
- `after-crash`: the daemon was SIGKILLed with a pooled VM; the restarted one kills it and
  keeps the claimed microvms.
"""
import json
import os
import sys
import time
import urllib.error
import urllib.request

import boto3
import modelcheck  # noqa: F401 - checks every answer against the service model
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from test_api import pool_ready, qemus

URL = os.environ["HEARTH_URL"]
KEY_A = json.loads(os.environ["HEARTH_KEY_A"])
CTX = os.environ["HEARTH_CTX_HOOKS"]
DEBIAN = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:debian-bookworm"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"
A = boto3.client(
    "lambda-microvms", endpoint_url=URL, region_name="us-east-1",
    aws_access_key_id=KEY_A["accessKeyId"], aws_secret_access_key=KEY_A["secretAccessKey"],
    config=Config(retries={"max_attempts": 1, "mode": "legacy"}),
)
ARN = f"arn:aws-hearth:lambda:hh-local-1:{KEY_A['account']}:microvm-image:pooled"


def signed(method, path, body=b""):
    req = AWSRequest(method=method, url=URL + path, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(KEY_A["accessKeyId"], KEY_A["secretAccessKey"]), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    r = urllib.request.Request(p.url, data=body or None, method=method, headers=dict(p.headers))
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sh(mid, cmd):
    status, body = signed("POST", f"/hearth/v1/microvms/{mid}/exec", json.dumps({"shell": cmd}).encode())
    assert status == 200, (status, body)
    return json.loads(body)["stdout"]


def spare():
    """The pooled VM, once the pool says it is ready."""
    wait(lambda: pool_ready("pooled"), "the pool to fill")
    ids = pooled()
    assert len(ids) == 1, ids
    return ids.pop()


def wait(fn, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def live_ids():
    return {m["microvmId"] for m in A.list_microvms()["items"] if m["state"] != "TERMINATED"}


def pooled():
    """The ids of QEMUs no microvm owns: the pool's."""
    return qemus() - live_ids()


def run(payload, egress=None):
    args = {"imageIdentifier": "pooled", "runHookPayload": payload}
    if egress is not None:
        args["egressNetworkConnectors"] = egress
    m = A.run_microvm(**args)
    assert m["state"] == "RUNNING", m
    return m


def identity(mid):
    return sh(mid, "cat /etc/hostname /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1")


def phase_claims():
    A.create_microvm_image(
        name="pooled", baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX},
        hooks={"port": 8080, "microvmHooks": {"run": "ENABLED"}},
    )
    v = wait(lambda: (lambda v: v if v["state"] in ("SUCCESSFUL", "FAILED") else None)(
        A.get_microvm_image_version(imageIdentifier="pooled", imageVersion="1")), "the build", 600)
    assert v["state"] == "SUCCESSFUL", v

    first = run("p1")["microvmId"]
    ready = spare()
    before = time.time()
    m = run("p2")
    second = m["microvmId"]
    assert second == ready, f"the run was not served from the pool: {second} vs pooled {ready}"
    assert m["startedAt"].timestamp() >= before - 1, (m, before)

    # The hook ran once, at the claim, with this run's payload.
    assert sh(second, "cat /tmp/hooks.log") == "/run p2\n", sh(second, "cat /tmp/hooks.log")
    # Its own machine-id and entropy; the hostname a fresh launch has.
    a, b = identity(first).splitlines(), identity(second).splitlines()
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2], (a, b)
    # The egress set at the claim: a run naming no connector gets INTERNET_EGRESS (the
    # service's default); one naming an empty list has none.
    assert m["egressNetworkConnectors"] == ["INTERNET_EGRESS"], m
    status, body = signed("GET", f"/hearth/v1/microvms/{second}/egress")
    assert status == 200 and json.loads(body)["egress"]["internet"] is True, (status, body)
    third = spare()
    m3 = run("p3", [])
    assert m3["microvmId"] == third, (m3, third)
    status, body = signed("GET", f"/hearth/v1/microvms/{third}/egress")
    assert status == 200 and json.loads(body)["egress"]["internet"] is False, (status, body)
    assert identity(third).splitlines()[1:] != identity(second).splitlines()[1:]
    # A pooled claim is a microvm like any other: exec, suspend, resume.
    A.suspend_microvm(microvmIdentifier=third)
    A.resume_microvm(microvmIdentifier=third)
    assert sh(third, "echo back") == "back\n"

    # Size 0 retires the pool: its QEMU goes. Size 1 brings it back at the next run.
    spare()
    for bad in ["17", "-1", "many"]:
        try:
            A.tag_resource(Resource=ARN, Tags={"hearth:pool-size": bad})
            raise AssertionError(f"pool size {bad} was taken")
        except A.exceptions.ValidationException as e:
            assert "hearth:pool-size" in str(e), e
    A.tag_resource(Resource=ARN, Tags={"hearth:pool-size": "0"})
    wait(lambda: not pooled(), "the retired pool's VM to stop", 30)
    assert run("p4")["state"] == "RUNNING"
    time.sleep(2)
    assert not pooled(), pooled()
    A.tag_resource(Resource=ARN, Tags={"hearth:pool-size": "1"})
    run("p5")
    print(json.dumps({"pooled": spare(), "live": sorted(live_ids())}))
    print("claims: ok")


def phase_after_crash(pooled_id, live):
    wait(lambda: pooled_id not in qemus(), "the dead daemon's pooled VM to be killed", 60)
    for mid in live:
        assert A.get_microvm(microvmIdentifier=mid)["state"] == "RUNNING"
        assert sh(mid, "echo alive") == "alive\n"
    for mid in live:
        A.terminate_microvm(microvmIdentifier=mid)
    print("after-crash: ok")


if sys.argv[1] == "claims":
    phase_claims()
else:
    state = json.loads(sys.argv[2])
    phase_after_crash(state["pooled"], state["live"])
