"""Quotas, host capacity and request rates of a running `hearth serve`, through boto3.

Run by crates/cli/tests/quotas.rs, one phase per daemon it starts (argv[1]):
- `quotas`: per-account quotas set with `hearth accounts set` (HEARTH_BIN) refuse with
  ServiceQuotaExceededException and leave nothing behind; a rate limit throttles with
  Retry-After and a retrying SDK client still succeeds;
- `capacity`: the daemon holds two 1-vCPU microvms (--cpu-overcommit); the third is
  refused with InsufficientCapacityException and leaves nothing behind;
- `reclaim`: the same host with --reclaim-idle suspends the longest-idle microvm instead.
Environment: HEARTH_URL, HEARTH_KEY_A (may name file:// artifacts beneath HEARTH_CTX),
HEARTH_STATE, HEARTH_BIN.
"""
import json
import os
import subprocess
import sys
import time

import boto3
import modelcheck  # noqa: F401 - checks every answer against the service model
import botocore
from botocore.config import Config

URL = os.environ["HEARTH_URL"]
KEY_A = json.loads(os.environ["HEARTH_KEY_A"])
ACCOUNT = KEY_A["account"]
CTX = os.environ["HEARTH_CTX"]
STATE = os.environ["HEARTH_STATE"]
BIN = os.environ["HEARTH_BIN"]
MINIMAL = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"


def client(retries=None):
    return boto3.client(
        "lambda-microvms",
        endpoint_url=URL,
        region_name="us-east-1",
        aws_access_key_id=KEY_A["accessKeyId"],
        aws_secret_access_key=KEY_A["secretAccessKey"],
        config=Config(retries=retries or {"max_attempts": 1, "mode": "legacy"}),
    )


A = client()


def operator(*args):
    """`hearth accounts set ACCOUNT ARGS`, as the operator would (the daemon keeps running)."""
    out = subprocess.run([BIN, "accounts", "set", ACCOUNT, "--state-dir", STATE, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def expect_error(code, status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
        assert got == (code, status), f"expected {code} {status}, got {got}: {e}"
        return e.response
    raise AssertionError(f"expected {code}, the call succeeded")


def wait(fn, pred, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if pred(v):
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {v}")


def live():
    items = A.list_microvms()["items"]
    return [m for m in items if m["state"] != "TERMINATED"]


def run():
    m = A.run_microvm(imageIdentifier="q")
    assert m["state"] == "RUNNING", m
    return m["microvmId"]


def microvm_dirs():
    d = os.path.join(STATE, "microvms")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def terminate_all():
    for m in live():
        A.terminate_microvm(microvmIdentifier=m["microvmId"])
    wait(live, lambda v: not v, "every microvm terminated")


def phase_quotas():
    A.create_microvm_image(
        name="q", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX}
    )
    wait(lambda: A.get_microvm_image_version(imageIdentifier="q", imageVersion="1"),
         lambda v: v["state"] in ("SUCCESSFUL", "FAILED"), "the build")

    # Microvms: one allowed; the second is refused, and no record or directory is made.
    operator("--quota", "microvms=1")
    m1 = run()
    before = (len(A.list_microvms()["items"]), microvm_dirs())
    r = expect_error("ServiceQuotaExceededException", 402, A.run_microvm, imageIdentifier="q")
    assert r["quotaCode"] == "microvms" and r["serviceCode"] == "hearth", r
    assert "hearth accounts set" in r["Error"]["Message"], r
    assert (len(A.list_microvms()["items"]), microvm_dirs()) == before, "a refused run left something"

    # Memory: the image's 512 MiB over a 256 MiB quota.
    operator("--quota", "microvms=default", "--quota", "memory-mib=256")
    r = expect_error("ServiceQuotaExceededException", 402, A.run_microvm, imageIdentifier="q")
    assert r["quotaCode"] == "memory-mib", r

    # A suspended microvm holds no vCPU: resuming it over the vCPU quota is a conflict.
    operator("--quota", "memory-mib=default", "--quota", "vcpus=0")
    A.suspend_microvm(microvmIdentifier=m1)
    wait(lambda: A.get_microvm(microvmIdentifier=m1), lambda v: v["state"] == "SUSPENDED", "suspended")
    expect_error("ConflictException", 409, A.resume_microvm, microvmIdentifier=m1)
    assert A.get_microvm(microvmIdentifier=m1)["state"] == "SUSPENDED"
    operator("--quota", "vcpus=default")
    A.resume_microvm(microvmIdentifier=m1)
    assert A.get_microvm(microvmIdentifier=m1)["state"] == "RUNNING"

    # Images and versions.
    operator("--quota", "images=1")
    image_dirs = sorted(os.listdir(os.path.join(STATE, "images", ACCOUNT)))
    r = expect_error("ServiceQuotaExceededException", 402, A.create_microvm_image,
                     name="q2", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX})
    assert r["quotaCode"] == "images", r
    operator("--quota", "images=default", "--quota", "image-versions=1")
    r = expect_error("ServiceQuotaExceededException", 402, A.update_microvm_image,
                     imageIdentifier="q", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX})
    assert r["quotaCode"] == "image-versions", r
    assert [i["name"] for i in A.list_microvm_images()["items"]] == ["q"]
    assert len(A.list_microvm_image_versions(imageIdentifier="q")["items"]) == 1
    assert sorted(os.listdir(os.path.join(STATE, "images", ACCOUNT))) == image_dirs
    operator("--quota", "image-versions=default")

    # Request rate: 1 a second, bursts of 2. Without retries the third call is throttled
    # with Retry-After; the SDK's own retries get every call through.
    operator("--rate-limit", "1/2")
    time.sleep(2.5)  # the daemon reads an account's rate every 2 s
    throttled = None
    for _ in range(4):
        try:
            A.list_microvms()
        except botocore.exceptions.ClientError as e:
            throttled = e.response
            break
    assert throttled is not None, "four calls at once were not throttled"
    assert throttled["Error"]["Code"] == "ThrottlingException", throttled
    assert throttled["ResponseMetadata"]["HTTPStatusCode"] == 429, throttled
    assert int(throttled["ResponseMetadata"]["HTTPHeaders"]["retry-after"]) >= 1, throttled
    retrying = client({"max_attempts": 10, "mode": "standard"})
    seen = []
    retrying.meta.events.register("needs-retry.*", lambda response=None, **kw: seen.append(
        response and response[1].get("Error", {}).get("Code")))
    for _ in range(5):
        retrying.get_microvm(microvmIdentifier=m1)
    assert "ThrottlingException" in seen, f"the retrying client was never throttled: {seen}"
    operator("--default-rate-limit")
    time.sleep(2.5)

    terminate_all()
    print("quotas: ok")


def phase_capacity():
    m1, m2 = run(), run()
    before = (len(A.list_microvms()["items"]), microvm_dirs())
    r = expect_error("InsufficientCapacityException", 500, A.run_microvm, imageIdentifier="q")
    assert "cannot hold another microvm" in r["Error"]["Message"], r
    assert (len(A.list_microvms()["items"]), microvm_dirs()) == before, "a refused run left something"
    # Room again once one is suspended.
    A.suspend_microvm(microvmIdentifier=m1)
    m3 = run()
    assert {m["microvmId"] for m in live()} == {m1, m2, m3}
    terminate_all()
    print("capacity: ok")


def phase_reclaim():
    m1 = run()
    time.sleep(1)
    m2 = run()
    time.sleep(3)  # both idle past --reclaim-idle 2; m1 the longest
    m3 = run()
    got = A.get_microvm(microvmIdentifier=m1)
    assert got["state"] == "SUSPENDED" and "make room" in got.get("stateReason", ""), got
    assert A.get_microvm(microvmIdentifier=m2)["state"] == "RUNNING"
    assert A.get_microvm(microvmIdentifier=m3)["state"] == "RUNNING"
    terminate_all()
    print("reclaim: ok")


{"quotas": phase_quotas, "capacity": phase_capacity, "reclaim": phase_reclaim}[sys.argv[1]]()
