"""Named egress connectors of a running `hearth serve`, through boto3 and SigV4 calls.

Run by crates/cli/tests/connectors.rs (argv: none, then `restart MICROVM` after the daemon
was killed and started again), with a test host (198.51.100.1) that serves DNS
(every name to itself) and HTTP on 80 (`http-ok <Host>`), the daemon's guests' resolver.
Environment: HEARTH_URL, HEARTH_KEY_A (may name file:// artifacts beneath HEARTH_CTX),
HEARTH_KEY_B, HEARTH_STATE, HEARTH_BIN.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import boto3
import modelcheck  # noqa: F401 - checks every answer against the service model
import botocore
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

URL = os.environ["HEARTH_URL"]
KEY_A = json.loads(os.environ["HEARTH_KEY_A"])
KEY_B = json.loads(os.environ["HEARTH_KEY_B"])
CTX = os.environ["HEARTH_CTX"]
STATE = os.environ["HEARTH_STATE"]
BIN = os.environ["HEARTH_BIN"]
DEBIAN = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:debian-bookworm"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"


def client(key):
    return boto3.client(
        "lambda-microvms", endpoint_url=URL, region_name="us-east-1",
        aws_access_key_id=key["accessKeyId"], aws_secret_access_key=key["secretAccessKey"],
        config=Config(retries={"max_attempts": 1}),
    )


A = client(KEY_A)


def signed(key, method, path, body=b""):
    req = AWSRequest(method=method, url=URL + path, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(key["accessKeyId"], key["secretAccessKey"]), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    r = urllib.request.Request(p.url, data=body or None, method=method, headers=dict(p.headers))
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def put(key, name, body):
    return signed(key, "PUT", f"/hearth/v1/egress-connectors/{name}", json.dumps(body).encode())


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == code, f"expected {code}: {e}"
        return e
    raise AssertionError(f"expected {code}, the call succeeded")


FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen('http://' + sys.argv[1] + '/', timeout=4).read().decode())
except Exception as e:
    print('FAILED ' + type(e).__name__)
"""


def fetch(mid, name):
    """What the guest gets from http://NAME/ (resolved by the guest, sent with Host: NAME)."""
    status, out = signed(KEY_A, "POST", f"/hearth/v1/microvms/{mid}/exec",
                         json.dumps({"command": ["python3", "-c", FETCH, name]}).encode())
    assert status == 200, (status, out)
    return out["stdout"].strip()


def eventually(fn, pred, what, timeout=30):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if pred(v):
            return v
        assert time.time() < deadline, f"timed out waiting for {what}: {v}"
        time.sleep(0.5)


def main():
    A.create_microvm_image(name="c", baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX})
    eventually(lambda: A.get_microvm_image_version(imageIdentifier="c", imageVersion="1")["state"],
               lambda s: s in ("SUCCESSFUL", "FAILED"), "the build", 600)

    # Validation: bounded, well-formed, and tenants' CIDRs within the operator's ceiling.
    for body, words in [
        ({"allowCidrs": ["10.0.0.0/8"]}, "--egress-allow-private"),
        ({"allowDomains": ["*"]}, "egress domain"),
        ({"allowDomains": ["a.test"], "deny": []}, "unknown connector field"),
        ({}, "at least one"),
        ({"allowCidrs": ["1.2.3.4"] * 65}, "limit"),
    ]:
        status, e = put(KEY_A, "bad", body)
        assert status == 400 and words in e["message"], (body, status, e)
    status, e = put(KEY_A, "bad..name", {"allowDomains": ["a.test"]})
    assert status == 400, (status, e)

    status, web = put(KEY_A, "web", {"allowDomains": ["allowed.test"], "allowCidrs": ["203.0.113.0/24:443/tcp"]})
    assert status == 200 and web["allowDomains"] == ["allowed.test"], web
    arn = web["connectorArn"]
    assert arn == f"arn:aws-hearth:lambda:hh-local-1:{KEY_A['account']}:egress-connector:web", arn
    assert signed(KEY_A, "GET", "/hearth/v1/egress-connectors/web")[1]["connectorArn"] == arn
    # Another account neither sees it nor may name it.
    assert signed(KEY_B, "GET", "/hearth/v1/egress-connectors/web")[0] == 404
    status, b = put(KEY_B, "bweb", {"allowDomains": ["allowed.test"]})
    assert status == 200, b
    expect_error("ResourceNotFoundException", A.run_microvm, imageIdentifier="c", egressNetworkConnectors=[b["connectorArn"]])
    expect_error("ResourceNotFoundException", A.run_microvm, imageIdentifier="c", egressNetworkConnectors=[arn + "-gone"])
    expect_error("ValidationException", A.run_microvm, imageIdentifier="c", egressNetworkConnectors=["vpc-connector-1"])
    # An image naming a connector is checked the same way (before any build starts).
    expect_error("ResourceNotFoundException", A.create_microvm_image, name="c2", baseImageArn=DEBIAN, buildRoleArn=ROLE,
                 codeArtifact={"uri": "file://" + CTX}, egressNetworkConnectors=[b["connectorArn"]])
    assert [i["name"] for i in A.list_microvm_images()["items"]] == ["c"]

    # A run naming the connector: its domains resolve and connect, others do not.
    m = A.run_microvm(imageIdentifier="c", egressNetworkConnectors=[arn])
    mid = m["microvmId"]
    assert m["state"] == "RUNNING" and m["egressNetworkConnectors"] == [arn], m
    got = fetch(mid, "allowed.test")
    assert got == "http-ok allowed.test", got
    assert "FAILED" in fetch(mid, "evil.test"), "a name off the connector's list was reached"

    # A change reaches the running microvm at once.
    status, _ = put(KEY_A, "web", {"allowDomains": ["other.test"]})
    assert status == 200
    assert "FAILED" in fetch(mid, "allowed.test"), "a name taken off the connector still reached"
    assert fetch(mid, "other.test") == "http-ok other.test"
    # In use: not deleted.
    status, e = signed(KEY_A, "DELETE", "/hearth/v1/egress-connectors/web")
    assert status == 409 and mid in e["message"], (status, e)

    # Suspend and resume: rebuilt from the connector as it is now.
    A.suspend_microvm(microvmIdentifier=mid)
    eventually(lambda: A.get_microvm(microvmIdentifier=mid)["state"], lambda s: s == "SUSPENDED", "suspended", 120)
    status, _ = put(KEY_A, "web", {"allowDomains": ["allowed.test"]})
    A.resume_microvm(microvmIdentifier=mid)
    assert A.get_microvm(microvmIdentifier=mid)["state"] == "RUNNING"
    assert fetch(mid, "allowed.test") == "http-ok allowed.test", "the connector's change while suspended did not apply"
    assert "FAILED" in fetch(mid, "other.test")

    # The operator's connector, set on the local database: every account sees it, and a
    # change reaches running microvms on the daemon's next policy pass.
    out = subprocess.run([BIN, "connectors", "set", "ops", "--allow-domain", "other.test", "--state-dir", STATE],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ops = out.stdout.strip()
    assert ops == "arn:aws-hearth:lambda:hh-local-1:hearth:egress-connector:ops", ops
    names = [c["connectorArn"] for c in signed(KEY_B, "GET", "/hearth/v1/egress-connectors")[1]["connectors"]]
    assert ops in names and arn not in names, names
    m2 = A.run_microvm(imageIdentifier="c", egressNetworkConnectors=[ops])["microvmId"]
    assert fetch(m2, "other.test") == "http-ok other.test"
    out = subprocess.run([BIN, "connectors", "set", "ops", "--allow-domain", "allowed.test", "--state-dir", STATE],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    eventually(lambda: fetch(m2, "allowed.test"), lambda v: v == "http-ok allowed.test", "the operator's change")
    assert "FAILED" in fetch(m2, "other.test")

    A.terminate_microvm(microvmIdentifier=mid)
    eventually(lambda: A.get_microvm(microvmIdentifier=mid)["state"], lambda s: s == "TERMINATED", "terminated")
    assert signed(KEY_A, "DELETE", "/hearth/v1/egress-connectors/web")[0] == 200
    assert signed(KEY_A, "GET", "/hearth/v1/egress-connectors/web")[0] == 404
    print(json.dumps({"running": m2}))
    print("connectors: ok")


def after_restart(m2):
    """The daemon was killed and started again: the microvm was reattached, its domain
    guard restarted, and the operator's connector still applies and still follows changes."""
    eventually(lambda: fetch(m2, "allowed.test"), lambda v: v == "http-ok allowed.test", "the guard after a restart", 120)
    assert "FAILED" in fetch(m2, "other.test")
    out = subprocess.run([BIN, "connectors", "set", "ops", "--allow-domain", "other.test", "--state-dir", STATE],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    eventually(lambda: fetch(m2, "other.test"), lambda v: v == "http-ok other.test", "the operator's change after a restart")
    A.terminate_microvm(microvmIdentifier=m2)
    print("restart: ok")


if len(sys.argv) > 2 and sys.argv[1] == "restart":
    after_restart(sys.argv[2])
else:
    main()
