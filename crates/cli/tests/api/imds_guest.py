"""Runs inside a microvm (copied into the image by test_imds.py): speaks IMDSv2 at
169.254.169.254 and signs calls to the daemon's AWS services behind the same address with
the credentials it got, in pure Python (the guest has no SDK and no network). Prints one
JSON object.

argv: `check` (everything below) or `refused HOST PATH` (a pass-through request with
another Host or path, which the relay must refuse).
"""
import datetime
import hashlib
import hmac
import http.client
import json
import os
import sys

MD = "169.254.169.254"


def call(method, path, headers=None, body=None, host=None):
    c = http.client.HTTPConnection(MD, 80, timeout=60)
    c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    c.putheader("Host", host or MD)
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    data = body.encode() if isinstance(body, str) else body
    c.putheader("Content-Length", str(len(data or b"")))
    c.endheaders(data)
    r = c.getresponse()
    out = (r.status, r.read().decode(errors="replace"), dict(r.getheaders()))
    c.close()
    return out


def sign(creds, service, body, target=None, content_type="application/x-www-form-urlencoded; charset=utf-8"):
    """SigV4 of a POST / to the metadata address, as the SDKs sign it."""
    region = os.environ["AWS_REGION"]
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body.encode()).hexdigest()
    headers = {"content-type": content_type, "host": MD, "x-amz-content-sha256": payload, "x-amz-date": amz_date,
               "x-amz-security-token": creds["Token"]}
    if target:
        headers["x-amz-target"] = target
    names = sorted(headers)
    canonical = "\n".join(["POST", "/", "", "".join(f"{n}:{headers[n]}\n" for n in names), ";".join(names), payload])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + creds["SecretAccessKey"]).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={creds['AccessKeyId']}/{scope}, SignedHeaders={';'.join(names)}, Signature={sig}"
    del headers["host"]
    return headers


def check():
    out = {"env": {k: os.environ.get(k) for k in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL_SECRETS_MANAGER")}}
    # IMDSv1 (no token) is refused; so is a forged token.
    out["v1"] = call("GET", "/latest/meta-data/iam/security-credentials/")[0]
    out["forged"] = call("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "forged"})[0]
    out["bad_ttl"] = call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "0"})[0]
    status, token, headers = call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    assert status == 200, (status, token)
    t = {"X-aws-ec2-metadata-token": token}
    out["instance_id"] = call("GET", "/latest/meta-data/instance-id", t)[1]
    out["region"] = call("GET", "/latest/meta-data/placement/region", t)[1]
    out["identity"] = json.loads(call("GET", "/latest/dynamic/instance-identity/document", t)[1])
    status, role, _ = call("GET", "/latest/meta-data/iam/security-credentials/", t)
    out["role_status"] = status
    if status != 200:
        return out
    out["role"] = role
    status, body, _ = call("GET", "/latest/meta-data/iam/security-credentials/" + role, t)
    assert status == 200, (status, body)
    creds = json.loads(body)
    out["creds"] = creds
    out["wrong_role"] = call("GET", "/latest/meta-data/iam/security-credentials/not-" + role, t)[0]
    body = "Action=GetCallerIdentity&Version=2011-06-15"
    status, text, _ = call("POST", "/", sign(creds, "sts", body), body)
    out["sts"] = [status, text]
    return out


def refused(host, path):
    status, text, _ = call("GET", path, {}, None, host=host)
    return {"status": status, "text": text}


if __name__ == "__main__":
    if sys.argv[1] == "check":
        print(json.dumps(check()))
    else:
        print(json.dumps(refused(sys.argv[2], sys.argv[3])))
