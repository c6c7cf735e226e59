"""Hostile tenants against a running `hearth serve`, through the public API only.

Run by crates/cli/tests/hostile.rs, which starts the daemon and passes, in the environment:
HEARTH_URL, HEARTH_KEY_A / HEARTH_KEY_B (two tenants; A may name file:// artifacts beneath
HEARTH_ROOT, B none), HEARTH_OUTSIDE (a directory the archives aim at; the Rust side checks
it stays empty), HEARTH_LOOPBACK_PORT (a loopback listener downloads must never reach).
"""
import hashlib
import http.client
import io
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

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
ROOT = os.environ["HEARTH_ROOT"]
OUTSIDE = os.environ["HEARTH_OUTSIDE"]
PORT = int(os.environ["HEARTH_LOOPBACK_PORT"])
STATE = os.environ["HEARTH_STATE"]
MINIMAL = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"


def client(key):
    return boto3.client(
        "lambda-microvms",
        endpoint_url=URL,
        region_name="us-east-1",
        aws_access_key_id=key["accessKeyId"],
        aws_secret_access_key=key["secretAccessKey"],
        config=Config(retries={"max_attempts": 1}),
    )


def expect_error(code, status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
        assert got == (code, status), f"expected {code} {status}, got {got}: {e}"
        return e.response["Error"]["Message"]
    raise AssertionError(f"expected {code}, the call succeeded")


def upload(key, body, claimed=None, extra=None):
    """POST /hearth/v1/artifacts signed over `claimed` (the body's SHA-256 unless given)."""
    headers = {"Content-Type": "application/zip", "X-Amz-Content-SHA256": claimed or hashlib.sha256(body).hexdigest()}
    headers.update(extra or {})
    req = AWSRequest(method="POST", url=URL + "/hearth/v1/artifacts", data=body, headers=headers)
    SigV4Auth(Credentials(key["accessKeyId"], key["secretAccessKey"]), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    r = urllib.request.Request(p.url, data=body, method="POST", headers=dict(p.headers))
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def make_zip(entries):
    """entries: (name, data) for files, (name, None) for directories, (name, '->target') for links."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            if data is None:
                info.external_attr = (0o040755 << 16) | 0x10
                z.writestr(info, b"")
            elif isinstance(data, str) and data.startswith("->"):
                info.external_attr = 0o120777 << 16
                z.writestr(info, data[2:])
            else:
                info.external_attr = 0o100644 << 16
                z.writestr(info, data)
    return buf.getvalue()


def uploaded(key, entries):
    status, out = upload(key, make_zip(entries))
    assert status == 201, (status, out)
    return out["uri"]


def wait_version(c, name, version="1", timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = c.get_microvm_image_version(imageIdentifier=name, imageVersion=version)
        if v["state"] in ("SUCCESSFUL", "FAILED"):
            return v
        time.sleep(0.5)
    raise AssertionError(f"{name} v{version} still building after {timeout}s")


def build(c, name, uri):
    c.create_microvm_image(name=name, baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": uri})
    return wait_version(c, name)


def failed_because(c, name, uri, *words):
    v = build(c, name, uri)
    assert v["state"] == "FAILED", (name, v)
    reason = v.get("stateReason", "")
    for w in words:
        assert w in reason, (name, w, reason)
    # Failures name what the tenant sent, never the daemon's own paths.
    assert STATE not in reason and "/proc/self" not in reason, (name, reason)
    return reason


def climbing_links(levels=24):
    """Links each of which looks inside lexically yet climbs one directory more: `x/up`
    is `..` (the root), `r1` is `x/up/..` (the root's parent), `rN` is `r(N-1)/..`."""
    entries = [("x/", None), ("x/up", "->.."), ("r1", "->x/up/..")]
    for i in range(2, levels + 1):
        entries.append((f"r{i}", f"->r{i-1}/.."))
    return entries, f"r{levels}"


def signed_raw(key, method, path, body=b"", headers=None):
    """A SigV4-signed request with the headers given (none added); (status, error code, JSON body)."""
    req = AWSRequest(method=method, url=URL + path, data=body, headers=headers or {})
    SigV4Auth(Credentials(key["accessKeyId"], key["secretAccessKey"], key.get("sessionToken")), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    u = urllib.parse.urlsplit(URL)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in p.headers.items():
        if k.lower() not in ("host", "content-length"):
            conn.putheader(k, v)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    return resp.status, resp.getheader("x-amzn-errortype"), json.loads(text or b"{}")


def raw_http(data):
    """Bytes straight to the daemon; its answer's status, error code and JSON body."""
    u = urllib.parse.urlsplit(URL)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    s.sendall(data)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(l.lower().split(": ", 1) for l in lines[1:])
    return int(lines[0].split()[1]), fields.get("x-amzn-errortype"), json.loads(body)


def wire(a):
    """The protocol's edges: every refusal carries its code, as rest-json servers answer."""
    raw = boto3.client(
        "lambda-microvms", endpoint_url=URL, region_name="us-east-1", aws_access_key_id=KEY_A["accessKeyId"],
        aws_secret_access_key=KEY_A["secretAccessKey"], config=Config(retries={"max_attempts": 1}, parameter_validation=False),
    )
    # Integers past the model's 32-bit range.
    expect_error("ValidationException", 400, raw.create_microvm_shell_auth_token, microvmIdentifier="mvm-x", expirationInMinutes=2**31)
    expect_error("ValidationException", 400, raw.list_microvms, maxResults=2**32 + 1)
    # An empty path label is not the list operation.
    expect_error("ValidationException", 400, raw.get_microvm, microvmIdentifier="")
    assert signed_raw(KEY_A, "GET", "/2025-09-09/microvms/")[:2] == (400, "ValidationException")
    # Media types: application/json (parameters allowed), none on a bodiless request.
    body = b'{"imageIdentifier": "no-such-image"}'
    assert signed_raw(KEY_A, "POST", "/2025-09-09/microvms", body, {"Content-Type": "text/plain"})[:2] == (415, "UnsupportedMediaTypeException")
    assert signed_raw(KEY_A, "POST", "/2025-09-09/microvms", body)[:2] == (415, "UnsupportedMediaTypeException")
    ok = signed_raw(KEY_A, "POST", "/2025-09-09/microvms", body, {"Content-Type": "application/json; charset=utf-8"})
    assert ok[:2] == (404, "ResourceNotFoundException"), ok
    assert signed_raw(KEY_A, "GET", "/2025-09-09/microvms")[0] == 200
    # An oversized body: 413 once authenticated; a bad signature or key is told as such.
    big = b" " * (2 << 20)
    json_ct = {"Content-Type": "application/json"}
    assert signed_raw(KEY_A, "POST", "/2025-09-09/microvms", big, json_ct)[:2] == (413, "RequestTooLargeException")
    wrong = dict(KEY_A, secretAccessKey="w" * 40)
    assert signed_raw(wrong, "POST", "/2025-09-09/microvms", big, json_ct)[:2] == (403, "InvalidSignatureException")
    nobody = {"accessKeyId": "HKIANOBODY", "secretAccessKey": "w" * 40}
    assert signed_raw(nobody, "POST", "/2025-09-09/microvms", big, json_ct)[:2] == (403, "UnrecognizedClientException")
    claimed = dict(json_ct, **{"X-Amz-Content-SHA256": hashlib.sha256(big).hexdigest()})
    assert signed_raw(KEY_A, "POST", "/2025-09-09/microvms", big, claimed)[:2] == (413, "RequestTooLargeException")
    # What the HTTP layer refuses itself: 414, 431, broken framing, each with its code.
    host = urllib.parse.urlsplit(URL).netloc.encode()
    for data, status in [
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"POST /2025-09-09/microvms HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde", 400),
        (b"POST /2025-09-09/microvms HTTP/1.1\r\nHost: " + host + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n", 400),
    ]:
        got, code, doc = raw_http(data)
        assert got == status and code and isinstance(doc.get("message"), str), (status, got, code, doc)


def aws_surfaces():
    """The AWS-compatible services and the newer extensions, attacked without a VM: a role
    session slipping past a Deny by percent-encoding a path, another tenant's secret and
    role, an oversized secret, forged MCP and link tokens."""
    def aws(name, key, token=None):
        return boto3.client(name, endpoint_url=URL, region_name="hh-local-1", aws_access_key_id=key["accessKeyId"],
                            aws_secret_access_key=key["secretAccessKey"], aws_session_token=token,
                            config=Config(retries={"max_attempts": 1}))
    account_a = KEY_A["account"]
    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": account_a}, "Action": "sts:AssumeRole"}]})
    iam = aws("iam", KEY_A)
    role = iam.create_role(RoleName="hostile-narrow", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    iam.put_role_policy(RoleName="hostile-narrow", PolicyName="p", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "lambda:*", "Resource": "*"},
        {"Effect": "Deny", "Action": ["lambda:ExecuteMicrovmCommand", "lambda:WriteMicrovmFile"], "Resource": "*"}]}))
    c = aws("sts", KEY_A).assume_role(RoleArn=role, RoleSessionName="hostile")["Credentials"]
    session = {"accessKeyId": c["AccessKeyId"], "secretAccessKey": c["SecretAccessKey"], "sessionToken": c["SessionToken"]}
    body = json.dumps({"command": ["true"]}).encode()
    for path in ["/hearth/v1/microvms/mvm-0000000000000000/exec", "/hearth/v1/microvms/mvm-0000000000000000/%65xec",
                 "/hearth/v1/%6dicrovms/mvm-0000000000000000/%65%78%65%63"]:
        status, code, _ = signed_raw(session, "POST", path, body, {"Content-Type": "application/json"})
        assert (status, code) == (403, "AccessDeniedException"), (path, status, code)
    # File writes too, the name encoded or not, whole or streamed (a signed
    # X-Amz-Content-Sha256 takes the literal `files` to the streamed path): the Deny on
    # lambda:WriteMicrovmFile holds. The query is sent encoded, as the SDKs send it.
    data = b"written"
    streamed = {"X-Amz-Content-Sha256": hashlib.sha256(data).hexdigest()}
    for path in ["/hearth/v1/microvms/mvm-0000000000000000/files", "/hearth/v1/microvms/mvm-0000000000000000/%66iles",
                 "/hearth/v1/%6dicrovms/mvm-0000000000000000/%66%69%6c%65%73",
                 "/hearth/v1/microvms/mvm-0000000000000000/%66iles/%61rchive"]:
        for headers in [{}, streamed]:
            status, code, out = signed_raw(session, "PUT", path + "?path=%2Fx", data, dict(headers))
            assert (status, code) == (403, "AccessDeniedException"), (path, headers, status, code, out)
            assert "lambda:WriteMicrovmFile" in out.get("message", ""), (path, out)
    # botocore's SigV4Auth on a raw URL signs the query as given (`path=/x`), SigV4 (and
    # AWS) encoded: refused as a bad signature that says so, whatever the path.
    status, code, out = signed_raw(session, "PUT", "/hearth/v1/microvms/mvm-0000000000000000/%66iles?path=/x", data)
    assert (status, code) == (403, "InvalidSignatureException") and "%2F" in out.get("message", ""), (status, code, out)
    # Without the session token, or with another's: refused.
    forged = dict(session, sessionToken=c["SessionToken"][:-4] + "AAAA")
    assert signed_raw(forged, "GET", "/2025-09-09/microvms")[0] == 403
    # Secrets: B never reaches A's by ARN; an oversized value is a 400.
    sm_a, sm_b = aws("secretsmanager", KEY_A), aws("secretsmanager", KEY_B)
    arn = sm_a.create_secret(Name="hostile/s", SecretString="v")["ARN"]
    expect_error("ResourceNotFoundException", 400, sm_b.get_secret_value, SecretId=arn)
    expect_error("InvalidParameterException", 400, sm_a.put_secret_value, SecretId=arn, SecretString="x" * 65537)
    # B may not run or assume A's role.
    expect_error("AccessDenied", 403, aws("sts", KEY_B).assume_role, RoleArn=role, RoleSessionName="steal")
    # Forged bearer tokens on the daemon's MCP path, a forged link on the API's host.
    for auth in ["Bearer forged.0000", "Bearer ", "Basic eDp5"]:
        r = urllib.request.Request(URL + "/mcp", data=b"{}", method="POST", headers={"Authorization": auth, "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(r, timeout=60)
            raise AssertionError("the MCP path answered a forged token")
        except urllib.error.HTTPError as e:
            assert e.code == 401, (auth, e.code)
    status, _, _ = signed_raw(KEY_B, "POST", "/hearth/v1/microvms/mvm-0000000000000000/link", b"{}")
    assert status == 404, status
    print("aws surfaces: ok", flush=True)


def main():
    a, b = client(KEY_A), client(KEY_B)
    wire(a)
    aws_surfaces()

    # --- file:// names no host path the operator did not give ---------------------------
    def refusal(c, uri):
        msg = expect_error("ValidationException", 400, c.create_microvm_image, name="f", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": uri})
        return msg.replace(json.dumps(uri), "URI")

    same = refusal(b, "file://" + ROOT + "/web")  # B may name no host path at all
    assert "not available to this account" in same, same
    for uri in [
        "file:///etc",
        "file:///etc/passwd",
        "file:///nonexistent-hearth-path",
        "/etc/shadow",
        "file://" + ROOT + "/../../etc",
        "file://" + ROOT + "/etc-link",
        "file://" + ROOT + "/etc-link/passwd",
        "file://" + ROOT + "/nonexistent",
        "file://" + ROOT + "/web/../../" + os.path.basename(STATE),
        "file:///dev/zero",
    ]:
        got = refusal(a, uri)
        # The same words whether the path exists or not: nothing learnt about the host.
        assert got == same, (uri, got, same)
    for uri in ["s3://bucket/app.zip", "ftp://x/app.zip", "hearth://artifacts/../../etc", "hearth://artifacts/" + "0" * 64]:
        expect_error("ValidationException", 400, a.create_microvm_image, name="f", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": uri})

    # --- uploads: authenticated before the body, kept only when they are what was signed --
    good = make_zip([("Dockerfile", b"FROM minimal\n")])
    status, out = upload(KEY_B, good, claimed=hashlib.sha256(b"other").hexdigest())
    assert status == 403 and "does not match" in out.get("message", ""), (status, out)
    status, out = upload(KEY_B, good, claimed="UNSIGNED-PAYLOAD")
    assert status == 403, (status, out)
    status, out = upload(KEY_B, b"#!/bin/sh\nthis is no zip\n")
    assert status == 400 and "zip" in out.get("message", ""), (status, out)
    forged = dict(KEY_B, secretAccessKey="wrong" + KEY_B["secretAccessKey"][5:])
    status, out = upload(forged, good)
    assert status == 403, (status, out)
    # A declared length over the account's artifact quota (32 GiB) is refused before a byte
    # is read.
    u = urllib.parse.urlsplit(URL)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body_hash = hashlib.sha256(b"").hexdigest()
    req = AWSRequest(method="POST", url=URL + "/hearth/v1/artifacts", data=b"", headers={"X-Amz-Content-SHA256": body_hash})
    SigV4Auth(Credentials(KEY_B["accessKeyId"], KEY_B["secretAccessKey"]), "lambda", "us-east-1").add_auth(req)
    conn.putrequest("POST", "/hearth/v1/artifacts", skip_accept_encoding=True)
    for k, v in req.headers.items():
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(64 << 30))
    conn.endheaders()
    resp = conn.getresponse()
    text = resp.read()
    assert resp.status == 402 and b"artifact-bytes" in text, (resp.status, text)
    assert resp.getheader("x-amzn-errortype") == "ServiceQuotaExceededException", resp.getheaders()
    conn.close()
    # One tenant's upload is nothing to another.
    mine = uploaded(KEY_A, [("Dockerfile", b"FROM minimal\n")])
    expect_error("ValidationException", 400, b.create_microvm_image, name="theirs", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": mine})

    # --- archives: links become links, never followed on the host ------------------------
    climb, top = climbing_links()
    rel_outside = OUTSIDE.lstrip("/")
    failed_because(b, "chain", uploaded(KEY_B, [("Dockerfile", b"FROM minimal\n")] + climb + [("t", "->" + top + "/" + rel_outside), ("t/pwned", b"x")]), "t/pwned")
    failed_because(b, "absolute", uploaded(KEY_B, [("Dockerfile", b"FROM minimal\n"), ("d", "->" + OUTSIDE), ("d/pwned", b"x")]), "d/pwned")
    failed_because(b, "dotdot", uploaded(KEY_B, [("Dockerfile", b"FROM minimal\n"), ("up", "->../../../../../../../../.." + OUTSIDE), ("up/pwned", b"x")]), "up/pwned")
    failed_because(b, "replace", uploaded(KEY_B, [("Dockerfile", b"FROM minimal\n"), ("w/", None), ("w", "->" + OUTSIDE), ("w/pwned", b"x")]))
    failed_because(b, "traversal", uploaded(KEY_B, [("Dockerfile", b"FROM minimal\n"), ("../../../../../../.." + OUTSIDE + "/pwned", b"x")]))
    # A Dockerfile that is a link to a host file: refused, and not a byte of it quoted.
    reason = failed_because(b, "dflink", uploaded(KEY_B, [("Dockerfile", "->/etc/passwd")]), "Dockerfile")
    assert "root:" not in reason, reason
    # COPY through a link in the context: refused on the host.
    reason = failed_because(b, "copylink", uploaded(KEY_B, [("Dockerfile", b"FROM minimal\nCOPY secrets/shadow /stolen\n"), ("secrets", "->/etc")]), "link")
    assert "root:" not in reason, reason
    # A directory context the operator allowed, holding a link to /etc: the same.
    failed_because(a, "sneaky", "file://" + ROOT + "/sneaky", "link")

    # --- downloads never reach the host or private networks ------------------------------
    for host in [f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"[::1]:{PORT}", f"127.1.2.3:{PORT}", f"0.0.0.0:{PORT}", f"2130706433:{PORT}"]:
        uri = f"http://{host}/app.zip"
        try:
            a.create_microvm_image(name="dl", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": uri})
        except botocore.exceptions.ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400, (uri, e)
            continue
        v = wait_version(a, "dl")
        assert v["state"] == "FAILED", (uri, v)
        assert "address" in v.get("stateReason", ""), (uri, v)
        a.delete_microvm_image(imageIdentifier="dl")

    # --- builds are per tenant ------------------------------------------------------------
    v = build(a, "web", "file://" + ROOT + "/web")
    assert v["state"] == "SUCCESSFUL", v
    uri = uploaded(KEY_B, [("Dockerfile", b"FROM hearth/web\nRUN true\n")])
    c = b.create_microvm_image(name="steal", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": uri})
    v = wait_version(b, "steal")
    assert v["state"] == "FAILED" and "no successfully built image web" in v.get("stateReason", ""), v
    # Each tenant's layers live in a directory of its own.
    assert os.path.isdir(os.path.join(STATE, "layers", KEY_A["account"])), os.listdir(os.path.join(STATE, "layers"))

    print("hostile: ok")


if __name__ == "__main__":
    main()
    sys.exit(0)
