"""The Lambda MicroVMs API of a running `hearth serve`, driven by boto3 and the AWS CLI.

Run by crates/cli/tests/api.rs, which starts the daemon and passes, in the environment:
HEARTH_URL, HEARTH_KEY_A / HEARTH_KEY_B (JSON access keys of two tenants), HEARTH_CTX
(a build context directory), HEARTH_STATE (the daemon's state directory), HEARTH_METRICS
(its /metrics listener). Its helpers serve test_ingress.py and test_pools.py too.
"""
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import boto3
import modelcheck  # noqa: F401 - checks every answer against the service model
import botocore
import websocket
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

URL = os.environ["HEARTH_URL"]
KEY_A = json.loads(os.environ["HEARTH_KEY_A"])
KEY_B = json.loads(os.environ["HEARTH_KEY_B"])
CTX = os.environ["HEARTH_CTX"]
CTX_HOOKS = os.environ["HEARTH_CTX_HOOKS"]
STATE = os.environ["HEARTH_STATE"]
# The daemon's /metrics (`hearth serve --metrics-listen`), where a test reads its pools.
METRICS = os.environ.get("HEARTH_METRICS")
# An app that listens on 8080 but has no /ready (busybox httpd over an empty directory).
CTX_LISTENS = os.path.join(os.path.dirname(CTX), "listens")
DEBIAN = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:debian-bookworm"
MINIMAL = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"


def client(key, validate=True, secret=None):
    return boto3.client(
        "lambda-microvms",
        endpoint_url=URL,
        region_name="us-east-1",
        aws_access_key_id=key["accessKeyId"],
        aws_secret_access_key=secret or key["secretAccessKey"],
        config=Config(parameter_validation=validate, retries={"max_attempts": 1}),
    )


def expect_error(code, status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
        assert got == (code, status), f"expected {code} {status}, got {got}: {e}"
        return e
    raise AssertionError(f"expected {code}, the call succeeded")


def signed(key, method, path, body=b""):
    """A raw SigV4-signed request (for Hearth's extensions and malformed bodies)."""
    req = AWSRequest(method=method, url=URL + path, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(key["accessKeyId"], key["secretAccessKey"]), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    r = urllib.request.Request(p.url, data=body or None, method=method, headers=dict(p.headers))
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def exec_in(key, mid, shell):
    status, body = signed(key, "POST", f"/hearth/v1/microvms/{mid}/exec", json.dumps({"shell": shell}).encode())
    assert status == 200, (status, body)
    return json.loads(body)


def http_get(url, headers):
    r = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_version(c, name, version, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = c.get_microvm_image_version(imageIdentifier=name, imageVersion=version)
        if v["state"] in ("SUCCESSFUL", "FAILED"):
            return v
        time.sleep(0.5)
    raise AssertionError(f"{name} v{version} still building after {timeout}s")


def wait_state(c, mid, state, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = c.get_microvm(microvmIdentifier=mid)
        if m["state"] == state:
            return m
        time.sleep(0.25)
    raise AssertionError(f"{mid} is {m['state']}, not {state}, after {timeout}s")


def aws(key, *args):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key["accessKeyId"], AWS_SECRET_ACCESS_KEY=key["secretAccessKey"], AWS_DEFAULT_REGION="us-east-1")
    aws_bin = os.path.join(os.path.dirname(sys.executable), "aws")
    out = subprocess.run([aws_bin, "lambda-microvms", *args, "--endpoint-url", URL, "--output", "json"], env=env, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


def qemus():
    """Microvm ids of this daemon's QEMUs (their process name), found by its state directory."""
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if STATE + "/run/" in cmd and "process=hearth-vm-" in cmd:
            name = cmd.split("process=hearth-vm-", 1)[1].split("\0")[0].split(",")[0]
            out.add("mvm-" + name.rsplit("-mvm-", 1)[-1])
    return out


def pool_ready(image):
    """The pool of `image` holds a VM ready to claim (the daemon's /metrics says so)."""
    with urllib.request.urlopen(METRICS + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return any(l.startswith("hearth_pool_ready{") and f'image="{image}"' in l and l.endswith(" 1") for l in text.splitlines())


def read_until(ws, needle, timeout=60):
    """Terminal output of a shell WebSocket until `needle` (bytes) appears."""
    seen = b""
    deadline = time.time() + timeout
    ws.settimeout(timeout)
    while needle not in seen:
        assert time.time() < deadline, f"{needle!r} never came; got {seen!r}"
        op, data = ws.recv_data()
        if op == websocket.ABNF.OPCODE_BINARY:
            seen += data
        elif op == websocket.ABNF.OPCODE_TEXT:
            raise AssertionError(f"unexpected control message {data!r} after {seen!r}")
    return seen


def arm64(a):
    """ARM_64 (emulated here, ~1.5x slower than x86-64; built alone, after the others): the
    version records it, a request naming both architectures is refused, the microvm is an
    aarch64 one, the second run is the pool's warm VM, and its endpoint reaches the app, a
    shell opens and a suspend/resume keeps its files."""
    arm = dict(name="arm", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX})
    expect_error("ValidationException", 400, a.create_microvm_image,
                 **dict(arm, cpuConfigurations=[{"architecture": "ARM_64"}, {"architecture": "X86_64"}]))
    created_arm = a.create_microvm_image(**dict(arm, cpuConfigurations=[{"architecture": "ARM_64"}]))
    assert created_arm["cpuConfigurations"] == [{"architecture": "ARM_64"}], created_arm
    v = wait_version(a, "arm", "1", timeout=480)
    assert v["state"] == "SUCCESSFUL" and v["cpuConfigurations"] == [{"architecture": "ARM_64"}], v
    arm_build = a.list_microvm_image_builds(imageIdentifier="arm", imageVersion="1")["items"][0]
    assert arm_build["architecture"] == "ARM_64" and arm_build["chipset"] == "GRAVITON", arm_build
    first = a.run_microvm(imageIdentifier="arm")["microvmId"]
    out = exec_in(KEY_A, first, "uname -m")
    assert out["stdout"] == "aarch64\n", out
    # The first run made the version's pool (the daemon's default size, 1): the next run
    # is its warm VM, seen on the host before the call.
    assert METRICS, "HEARTH_METRICS names the daemon's metrics listener"
    deadline = time.time() + 300
    while not pool_ready("arm"):
        assert time.time() < deadline, "the arm64 pool never filled"
        time.sleep(0.5)
    # The one QEMU no microvm owns is arm's pooled VM: no other image has been run before
    # this in main(), so no other image has a pool (keep it so when adding steps above).
    spare = qemus() - {m["microvmId"] for m in a.list_microvms()["items"] if m["state"] != "TERMINATED"}
    assert len(spare) == 1, spare
    second = a.run_microvm(imageIdentifier="arm", ingressNetworkConnectors=["SHELL_INGRESS"])
    mid = second["microvmId"]
    assert second["state"] == "RUNNING" and mid == spare.pop(), (second, spare)
    token = a.create_microvm_auth_token(microvmIdentifier=mid, expirationInMinutes=5, allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
    assert http_get(f"{URL}/microvms/{mid}/ready", {"X-aws-proxy-auth": token}) == (200, b"ok\n")
    shell_token = a.create_microvm_shell_auth_token(microvmIdentifier=mid, expirationInMinutes=5)["authToken"]["X-aws-proxy-auth"]
    ws = websocket.create_connection(f"ws://{urllib.parse.urlsplit(URL).netloc}/shell/{mid}", header=[f"X-aws-proxy-auth: {shell_token}"], timeout=120)
    ws.send_binary(b"uname -m; echo kept > /workspace/k; echo s$((1+1))\n")
    assert b"aarch64\r\n" in read_until(ws, b"s2\r\n", timeout=120)
    ws.close()
    a.suspend_microvm(microvmIdentifier=mid)
    assert a.get_microvm(microvmIdentifier=mid)["state"] == "SUSPENDED"
    a.resume_microvm(microvmIdentifier=mid)
    assert exec_in(KEY_A, mid, "cat /workspace/k; uname -m")["stdout"] == "kept\naarch64\n"
    for m in (first, mid):
        a.terminate_microvm(microvmIdentifier=m)
        wait_state(a, m, "TERMINATED")
    a.delete_microvm_image(imageIdentifier="arm")


def main():
    a, b = client(KEY_A), client(KEY_B)

    managed = [i["imageArn"] for i in a.list_managed_microvm_images()["items"]]
    assert MINIMAL in managed, managed
    managed_version = a.list_managed_microvm_image_versions(imageIdentifier=MINIMAL)["items"][0]
    assert managed_version["imageVersion"] == "1" and managed_version["status"] == "AVAILABLE", managed_version

    # Image creation, with an idempotent retry and a reused token with other parameters.
    req = dict(
        name="web",
        baseImageArn=MINIMAL,
        buildRoleArn=ROLE,
        codeArtifact={"uri": "file://" + CTX},
        hooks={"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 60}},
        environmentVariables={"GREETING": "hi"},
        tags={"team": "alpha"},
        clientToken="create-web-1",
    )
    created = a.create_microvm_image(**req)
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert created["name"] == "web" and created["imageVersion"] == "1" and created["state"] == "CREATING"
    again = a.create_microvm_image(**req)
    assert again["imageArn"] == created["imageArn"] and again["imageVersion"] == "1"
    expect_error("ConflictException", 409, a.create_microvm_image, **dict(req, description="other"))
    expect_error("ConflictException", 409, a.create_microvm_image, **dict(req, clientToken="create-web-2"))
    # Names become directories: nothing but the model's characters, whole.
    expect_error("ValidationException", 400, a.create_microvm_image, **dict(req, name="-/../../escape", clientToken="escape"))
    expect_error("ResourceNotFoundException", 404, a.get_microvm_image, imageIdentifier="-/../..")
    expect_error("ResourceNotFoundException", 404, a.delete_microvm_image, imageIdentifier="..")
    # Image hooks are called only when ENABLED: an app without /ready is taken once it
    # listens; the same app with the ready hook enabled fails its build.
    a.create_microvm_image(name="listens", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX_LISTENS})
    a.create_microvm_image(
        name="readyhook", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX_LISTENS},
        hooks={"microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 5}},
    )
    v = wait_version(a, "web", "1")
    assert v["state"] == "SUCCESSFUL", v
    builds = a.list_microvm_image_builds(imageIdentifier="web", imageVersion="1")["items"]
    assert builds[0]["buildState"] == "SUCCESSFUL", builds
    sizes = a.get_microvm_image_build(imageIdentifier="web", imageVersion="1", buildId=builds[0]["buildId"])["snapshotBuild"]
    assert all(sizes.get(k, 0) > 0 for k in ("memorySnapshotSizeInBytes", "diskSnapshotSizeInBytes", "codeInstallSizeInBytes")), sizes
    v = wait_version(a, "listens", "1", timeout=480)
    assert v["state"] == "SUCCESSFUL", v
    v = wait_version(a, "readyhook", "1", timeout=480)
    assert v["state"] == "FAILED" and "/ready answered 404" in v.get("stateReason", ""), v
    a.delete_microvm_image(imageIdentifier="listens")
    a.delete_microvm_image(imageIdentifier="readyhook")
    arm64(a)
    image = a.get_microvm_image(imageIdentifier=created["imageArn"])
    assert image["state"] == "CREATED" and image["latestActiveImageVersion"] == "1", image

    # Tags.
    arn = created["imageArn"]
    assert a.list_tags(Resource=arn)["Tags"] == {"team": "alpha"}
    a.tag_resource(Resource=arn, Tags={"env": "test"})
    a.untag_resource(Resource=arn, TagKeys=["team"])
    assert a.list_tags(Resource=arn)["Tags"] == {"env": "test"}

    # Run three, idempotently; list with pagination.
    first = a.run_microvm(imageIdentifier="web", clientToken="run-1")
    assert a.run_microvm(imageIdentifier="web", clientToken="run-1")["microvmId"] == first["microvmId"]
    ids = {first["microvmId"], a.run_microvm(imageIdentifier="web")["microvmId"], a.run_microvm(imageIdentifier=arn, imageVersion="1")["microvmId"]}
    assert len(ids) == 3
    for mid in ids:
        assert a.get_microvm(microvmIdentifier=mid)["state"] == "RUNNING"
    # A run naming no egress connector (and an image naming none) gets INTERNET_EGRESS, as on the service.
    assert a.get_microvm(microvmIdentifier=first["microvmId"])["egressNetworkConnectors"] == ["INTERNET_EGRESS"]
    page = a.list_microvms(maxResults=2)
    assert len(page["items"]) == 2 and "nextToken" in page
    listed = {m["microvmId"] for m in page["items"]}
    while "nextToken" in page:
        page = a.list_microvms(maxResults=2, nextToken=page["nextToken"])
        assert len(page["items"]) <= 2, page
        listed |= {m["microvmId"] for m in page["items"]}
    assert ids <= listed, (ids, listed)
    paged = {m["microvmId"] for p in a.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 1}) for m in p["items"]}
    assert ids <= paged

    # The app started at build time answers in the clone; state survives suspend/resume.
    mid = first["microvmId"]
    out = exec_in(KEY_A, mid, "busybox wget -q -O- http://127.0.0.1:8080/ready && echo $GREETING && echo 41 > /workspace/n")
    assert out["stdout"] == "ok\nhi\n", out
    # Egress changes while it runs (Hearth extension), kept across suspend/resume.
    status, body = signed(KEY_A, "PUT", f"/hearth/v1/microvms/{mid}/egress", json.dumps({"internet": True, "deny": ["198.51.100.0/24:443/tcp"]}).encode())
    assert status == 200, (status, body)
    status, body = signed(KEY_A, "PUT", f"/hearth/v1/microvms/{mid}/egress", b'{"internet": true, "allow": ["10.0.0.1/8"]}')
    assert status == 400 and b"host bits" in body, (status, body)
    status, body = signed(KEY_B, "PUT", f"/hearth/v1/microvms/{mid}/egress", b'{"internet": true}')
    assert status == 404, (status, body)
    a.suspend_microvm(microvmIdentifier=mid)
    assert a.get_microvm(microvmIdentifier=mid)["state"] == "SUSPENDED"
    expect_error("ConflictException", 409, a.suspend_microvm, microvmIdentifier=mid)
    a.resume_microvm(microvmIdentifier=mid)
    assert a.get_microvm(microvmIdentifier=mid)["state"] == "RUNNING"
    assert exec_in(KEY_A, mid, "cat /workspace/n")["stdout"] == "41\n"
    status, body = signed(KEY_A, "GET", f"/hearth/v1/microvms/{mid}/egress")
    assert status == 200 and json.loads(body)["egress"]["deny"][0]["cidr"] == "198.51.100.0/24", (status, body)
    expect_error("ConflictException", 409, a.resume_microvm, microvmIdentifier=mid)
    # The endpoint: HTTP to the app through a token, refused without one.
    token = a.create_microvm_auth_token(microvmIdentifier=mid, expirationInMinutes=5, allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
    # (The path form; the endpoint's own host, over TLS, is test_ingress.py's.)
    endpoint = f"{URL}/microvms/{mid}"
    assert http_get(endpoint + "/ready", {"X-aws-proxy-auth": token}) == (200, b"ok\n")
    assert http_get(endpoint + "/ready", {})[0] == 403
    assert http_get(endpoint + "/ready", {"X-aws-proxy-auth": token[:-2] + "00"})[0] == 403
    assert http_get(endpoint + "/ready", {"X-aws-proxy-auth": token, "X-aws-proxy-port": "9999"})[0] == 403
    other = [i for i in ids if i != mid][0]
    assert http_get(endpoint.replace(mid, other) + "/ready", {"X-aws-proxy-auth": token})[0] == 403
    expect_error("ResourceNotFoundException", 404, b.create_microvm_auth_token, microvmIdentifier=mid, expirationInMinutes=5, allowedPorts=[{"allPorts": {}}])
    # Oversized headers are refused by the daemon's HTTP layer, before any token check.
    huge = {"X-aws-proxy-auth": token}
    huge.update({f"X-Pad-{i}": "x" * 200 for i in range(200)})
    status, _ = http_get(endpoint + "/ready", huge)
    assert status in (400, 431), status
    # Streamed exec: lines arrive as the command writes them.
    status, body = signed(KEY_A, "POST", f"/hearth/v1/microvms/{mid}/exec?stream=true", b'{"shell": "echo one; sleep 1; echo two >&2; exit 4"}')
    lines = [json.loads(l) for l in body.decode().splitlines()]
    assert status == 200 and lines == [{"stdout": "one\n"}, {"stderr": "two\n"}, {"exit": {"code": 4, "signal": None}}], (status, lines)

    # Tenants never see each other's resources.
    expect_error("ResourceNotFoundException", 404, b.get_microvm, microvmIdentifier=mid)
    expect_error("ResourceNotFoundException", 404, b.terminate_microvm, microvmIdentifier=mid)
    expect_error("ResourceNotFoundException", 404, b.get_microvm_image, imageIdentifier=arn)
    expect_error("ResourceNotFoundException", 404, b.list_tags, Resource=arn)
    assert b.list_microvms()["items"] == [] and b.list_microvm_images()["items"] == []
    status, _ = signed(KEY_B, "POST", f"/hearth/v1/microvms/{mid}/exec", b'{"shell":"true"}')
    assert status == 404

    # Idle policy (the model's shortest idle time is 60 s): three microvms start now and are
    # checked after the other steps. One is idle and auto-resumes, one is idle without
    # auto-resume, one runs a busy loop (guest work counts as activity, API calls or not).
    policy = {"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 600}
    idle = a.run_microvm(imageIdentifier="web", idlePolicy=dict(policy, autoResumeEnabled=True))["microvmId"]
    idle_manual = a.run_microvm(imageIdentifier="web", idlePolicy=dict(policy, autoResumeEnabled=False))["microvmId"]
    busy = a.run_microvm(imageIdentifier="web", idlePolicy=dict(policy, autoResumeEnabled=False))["microvmId"]
    assert a.get_microvm(microvmIdentifier=idle)["idlePolicy"]["maxIdleDurationSeconds"] == 60
    exec_in(KEY_A, idle, "echo before > /workspace/f")
    idle_token = a.create_microvm_auth_token(microvmIdentifier=idle, expirationInMinutes=30, allowedPorts=[{"range": {"startPort": 8000, "endPort": 8100}}])["authToken"]["X-aws-proxy-auth"]
    idle_endpoint = f"{URL}/microvms/{idle}"
    exec_in(KEY_A, busy, "sh -c 'echo $$ > /tmp/busy.pid; while :; do :; done' >/dev/null 2>&1 &")

    # Lifecycle hooks of the app: /run with the payload, /suspend, /resume; a refused /run
    # means the microvm is not handed out.
    hooks = {
        "port": 8080,
        "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 20, "suspend": "ENABLED", "resume": "ENABLED", "terminate": "ENABLED"},
        "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 120},
    }
    a.create_microvm_image(name="hooked", baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX_HOOKS}, hooks=hooks)
    assert wait_version(a, "hooked", "1")["state"] == "SUCCESSFUL"
    h = a.run_microvm(imageIdentifier="hooked", runHookPayload="tenant-42")
    assert h["state"] == "RUNNING", h
    a.suspend_microvm(microvmIdentifier=h["microvmId"])
    a.resume_microvm(microvmIdentifier=h["microvmId"])
    log = exec_in(KEY_A, h["microvmId"], "cat /tmp/hooks.log")["stdout"]
    assert log == "/run tenant-42\n/suspend \n/resume \n", repr(log)
    refused = a.run_microvm(imageIdentifier="hooked", runHookPayload="refuse")
    assert refused["state"] == "TERMINATED" and "/run hook answered 500" in refused["stateReason"], refused
    a.terminate_microvm(microvmIdentifier=h["microvmId"])

    # Bad input: the model's error types and codes, never a 500.
    raw = client(KEY_A, validate=False)
    expect_error("ValidationException", 400, raw.run_microvm, imageIdentifier="web", maximumDurationInSeconds=28801)
    expect_error("ValidationException", 400, raw.run_microvm, imageIdentifier="web", maximumDurationInSeconds="long")
    expect_error("ValidationException", 400, raw.list_microvms, maxResults=0)
    expect_error("ValidationException", 400, raw.list_microvms, nextToken="garbage")
    expect_error("ResourceNotFoundException", 404, a.get_microvm, microvmIdentifier="mvm-0000000000000000")
    expect_error("ResourceNotFoundException", 404, a.run_microvm, imageIdentifier="no-such-image")
    status, body = signed(KEY_A, "POST", "/2025-09-09/microvms", b'{"imageIdentifier": "web", "colour": "blue"}')
    assert status == 400 and b"colour" in body, (status, body)
    status, body = signed(KEY_A, "POST", "/2025-09-09/microvms", b'{"imageIdentifier": ')
    assert status == 400, (status, body)
    expect_error("InvalidSignatureException", 403, client(KEY_A, secret="wrong" * 8).list_microvms)
    expect_error("UnrecognizedClientException", 403, client({"accessKeyId": "HKIANOBODY", "secretAccessKey": "x" * 40}).list_microvms)
    req_unsigned = urllib.request.Request(URL + "/2025-09-09/microvms")
    try:
        urllib.request.urlopen(req_unsigned, timeout=10)
        raise AssertionError("an unsigned request was served")
    except urllib.error.HTTPError as e:
        assert e.code == 403

    # maximumDurationInSeconds terminates.
    short = a.run_microvm(imageIdentifier="web", maximumDurationInSeconds=2)
    m = wait_state(a, short["microvmId"], "TERMINATED", timeout=30)
    assert "maximumDurationInSeconds" in m["stateReason"]

    # Suspend and Terminate raced: one wins, the state is consistent.
    import concurrent.futures
    race = a.run_microvm(imageIdentifier="web")["microvmId"]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fs = [ex.submit(a.suspend_microvm, microvmIdentifier=race), ex.submit(a.terminate_microvm, microvmIdentifier=race)]
        results = []
        for f in fs:
            try:
                f.result()
                results.append("ok")
            except botocore.exceptions.ClientError as e:
                results.append(e.response["Error"]["Code"])
    assert a.get_microvm(microvmIdentifier=race)["state"] == "TERMINATED", results
    assert results[1] == "ok", results

    # The AWS CLI.
    rc, out, err = aws(KEY_A, "list-managed-microvm-images")
    assert rc == 0 and MINIMAL in out, (rc, out, err)
    rc, out, err = aws(KEY_A, "run-microvm", "--image-identifier", "web")
    assert rc == 0, err
    cli_id = json.loads(out)["microvmId"]
    rc, out, err = aws(KEY_A, "get-microvm", "--microvm-identifier", cli_id)
    assert rc == 0 and json.loads(out)["state"] == "RUNNING", (out, err)
    rc, out, err = aws(KEY_A, "list-microvms", "--max-items", "1")
    assert rc == 0 and len(json.loads(out)["items"]) == 1, (out, err)
    rc, out, err = aws(KEY_A, "terminate-microvm", "--microvm-identifier", cli_id)
    assert rc == 0, err
    rc, out, err = aws(KEY_A, "get-microvm", "--microvm-identifier", "mvm-nope")
    assert rc != 0 and "ResourceNotFoundException" in err, err

    # The idle ones were suspended; the busy one was not.
    m = wait_state(a, idle, "SUSPENDED", timeout=120)
    assert "maxIdleDurationSeconds" in m.get("stateReason", ""), m
    wait_state(a, idle_manual, "SUSPENDED", timeout=90)
    assert a.get_microvm(microvmIdentifier=busy)["state"] == "RUNNING", "a busy guest was suspended as idle"
    exec_in(KEY_A, busy, "kill $(cat /tmp/busy.pid)")
    # Traffic to the endpoint resumes it, without the client seeing an error.
    assert http_get(idle_endpoint + "/ready", {"X-aws-proxy-auth": idle_token}) == (200, b"ok\n")
    assert a.get_microvm(microvmIdentifier=idle)["state"] == "RUNNING", "the request did not resume it"
    assert exec_in(KEY_A, idle, "cat /workspace/f")["stdout"] == "before\n"
    status, body = signed(KEY_A, "POST", f"/hearth/v1/microvms/{idle_manual}/exec", b'{"shell":"true"}')
    assert status == 409 and b"ResumeMicrovm" in body, (status, body)

    # Terminate: TERMINATED, a second time is a conflict; an image in use cannot go.
    expect_error("ConflictException", 409, a.delete_microvm_image, imageIdentifier="web")
    for m in a.list_microvms()["items"]:
        if m["state"] != "TERMINATED":
            a.terminate_microvm(microvmIdentifier=m["microvmId"])
    expect_error("ConflictException", 409, a.terminate_microvm, microvmIdentifier=mid)
    assert a.get_microvm(microvmIdentifier=mid)["state"] == "TERMINATED"

    # Usage was metered while they ran.
    status, body = signed(KEY_A, "GET", "/hearth/v1/usage")
    usage = json.loads(body)["usage"]
    assert status == 200 and usage["vcpuSeconds"] > 0 and usage["gibSeconds"] > 0, usage
    status, body = signed(KEY_B, "GET", "/hearth/v1/usage")
    assert json.loads(body)["usage"]["vcpuSeconds"] == 0

    # One suspended and one running microvm are left for the restart test.
    keep = a.run_microvm(imageIdentifier="web", clientToken="keep")["microvmId"]
    exec_in(KEY_A, keep, "echo kept > /workspace/k")
    a.suspend_microvm(microvmIdentifier=keep)
    alive = a.run_microvm(imageIdentifier="web", clientToken="alive")["microvmId"]
    exec_in(KEY_A, alive, "echo alive > /workspace/a; sh -c 'while :; do date +%s > /tmp/tick; sleep 1; done' >/dev/null 2>&1 &")
    print(json.dumps({"suspended": keep, "running": alive}))


def after_restart():
    a = client(KEY_A)
    keep = a.run_microvm(imageIdentifier="web", clientToken="keep")["microvmId"]  # idempotent: the same one
    assert a.get_microvm(microvmIdentifier=keep)["state"] == "SUSPENDED"
    a.resume_microvm(microvmIdentifier=keep)
    assert exec_in(KEY_A, keep, "cat /workspace/k")["stdout"] == "kept\n"
    a.terminate_microvm(microvmIdentifier=keep)
    # The running one outlived the killed daemon and was reattached, processes and all.
    alive = a.run_microvm(imageIdentifier="web", clientToken="alive")["microvmId"]
    m = a.get_microvm(microvmIdentifier=alive)
    assert m["state"] == "RUNNING", m
    assert exec_in(KEY_A, alive, "cat /workspace/a")["stdout"] == "alive\n"
    t0 = int(exec_in(KEY_A, alive, "cat /tmp/tick")["stdout"])
    time.sleep(2.5)
    assert int(exec_in(KEY_A, alive, "cat /tmp/tick")["stdout"]) > t0, "the guest's process stopped"
    a.terminate_microvm(microvmIdentifier=alive)
    a.delete_microvm_image(imageIdentifier="web")
    a.delete_microvm_image(imageIdentifier="hooked")
    assert a.list_microvm_images()["items"] == []
    print("ok")


if __name__ == "__main__":
    after_restart() if sys.argv[1:] == ["after-restart"] else main()
