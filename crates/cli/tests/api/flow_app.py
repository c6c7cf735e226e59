"""The reference flow's app (copied into the image by test_flow.py): at `/run` it reads the
secret whose ARN is the run hook's payload with boto3, through the microvm's execution role
(credentials from IMDSv2, Secrets Manager at the endpoint the guest's environment names),
and keeps the value in memory only. `GET /secret` answers the value's SHA-256 (or the
error code), never the value. Its `/suspend` and `/resume` hooks ask STS who they are
(`GET /hooks` answers that): the runtime hooks run with the execution role.

At its build, `/validate` runs flow_build.py's proof with the build role's credentials and
keeps it (in the template's memory: `GET /build` answers it); it answers 500 when the build
secret could not be read, so a build whose role may not read it fails.
"""
import hashlib
import http.server
import json
import sys

sys.path.insert(0, "/app/lib")
import boto3  # noqa: E402 - from /app/lib, copied in with the app
import botocore.exceptions  # noqa: E402

sys.path.insert(0, "/app")
import flow_build  # noqa: E402

HELD = {"value": None, "result": "none", "build": None, "hooks": {}}


class H(http.server.BaseHTTPRequestHandler):
    def answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        # The image hook (a GET): at the build, with the build role's credentials.
        if self.path == "/validate":
            p = flow_build.proof()
            HELD["build"] = p
            print("validate: build secret", p["build_secret"], "as", p["arn"], file=sys.stderr, flush=True)
            self.answer(200 if p["build_secret"].startswith("sha256:") else 500, b"")
            return
        if self.path == "/build":
            self.answer(200, json.dumps(HELD["build"]).encode())
            return
        if self.path == "/hooks":
            self.answer(200, json.dumps(HELD["hooks"]).encode())
            return
        self.answer(200, HELD["result"].encode())

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.path == "/run" and data.startswith("arn:"):
            try:
                value = boto3.client("secretsmanager").get_secret_value(SecretId=data)["SecretString"]
                HELD["value"] = value
                HELD["result"] = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
            except botocore.exceptions.ClientError as e:
                HELD["result"] = "error:" + e.response["Error"]["Code"]
            except Exception as e:  # noqa: BLE001 - the kind of failure is the result
                HELD["result"] = "error:" + type(e).__name__ + ":" + str(e)[:200]
        if self.path in ("/suspend", "/resume"):
            # The runtime hooks run with the execution role: who they are, by STS (a
            # session of their own, so no credentials cached before the suspend are used).
            try:
                HELD["hooks"][self.path] = boto3.session.Session().client("sts").get_caller_identity()["Arn"]
            except Exception as e:  # noqa: BLE001 - the kind of failure is the result
                HELD["hooks"][self.path] = "error:" + type(e).__name__ + ":" + str(e)[:200]
        self.answer(200, b"")

    def log_message(self, *a):
        pass


http.server.HTTPServer(("127.0.0.1", 8080), H).serve_forever()
