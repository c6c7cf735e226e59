"""The reference flow's build step (copied into the image by secrets_flow.rs): run by the
Dockerfile's RUN step and by the app's `/validate` hook, both in the builder VM, with the
build role's credentials (IMDSv2 over the agent channel, found by boto3's default chain).

It reads the build's secret (`agent/build-token`, which the build role may read) and one
it may not (`agent/not-for-builds`), and keeps only their SHA-256 or the error code, never
a value; it also keeps the credentials it used (a test's capture: they must be refused once
the build is done), its caller ARN and the metadata's identity document. As a script
(the RUN step) it writes that to /app/build-proof.json and prints what the build log may
show.
"""
import hashlib
import json
import sys
import urllib.request

sys.path.insert(0, "/app/lib")
import boto3  # noqa: E402 - from /app/lib, copied in with the app
import botocore.exceptions  # noqa: E402

MD = "http://169.254.169.254"


def identity():
    t = urllib.request.Request(MD + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = urllib.request.urlopen(t, timeout=30).read().decode()
    r = urllib.request.Request(MD + "/latest/dynamic/instance-identity/document", headers={"X-aws-ec2-metadata-token": token})
    return json.loads(urllib.request.urlopen(r, timeout=30).read())


def proof():
    # A session of its own: the default one would keep the build's credentials cached.
    s = boto3.session.Session()
    out = {}
    for key, name in (("build_secret", "agent/build-token"), ("forbidden", "agent/not-for-builds")):
        try:
            v = s.client("secretsmanager").get_secret_value(SecretId=name)["SecretString"]
            out[key] = "sha256:" + hashlib.sha256(v.encode()).hexdigest()
        except botocore.exceptions.ClientError as e:
            out[key] = "error:" + e.response["Error"]["Code"]
        except Exception as e:  # noqa: BLE001 - the kind of failure is the result
            out[key] = "error:" + type(e).__name__ + ":" + str(e)[:200]
    try:
        out["arn"] = s.client("sts").get_caller_identity()["Arn"]
        c = s.get_credentials().get_frozen_credentials()
        out["creds"] = {"AccessKeyId": c.access_key, "SecretAccessKey": c.secret_key, "Token": c.token}
    except Exception as e:  # noqa: BLE001
        out["arn"] = "error:" + type(e).__name__ + ":" + str(e)[:200]
    out["identity"] = identity()
    return out


if __name__ == "__main__":
    p = proof()
    with open("/app/build-proof.json", "w") as f:
        json.dump(p, f)
    print(json.dumps({k: p[k] for k in ("build_secret", "forbidden", "arn")}))
