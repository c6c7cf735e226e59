"""`hearth mcp` through the official MCP Python SDK (`mcp`), over stdio and Streamable HTTP.

Run by tests/mcp.rs against a real daemon: `python test_mcp.py stdio|http`. Every tool call
is checked; a tool error where success is expected (or the reverse) fails the test.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import boto3
import httpx2
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

URL = os.environ["HEARTH_URL"]
KEY = json.loads(os.environ["HEARTH_KEY_A"])
HEARTH = os.environ["HEARTH_BIN"]
ENV = {
    "HEARTH_ENDPOINT": URL,
    "AWS_ACCESS_KEY_ID": KEY["accessKeyId"],
    "AWS_SECRET_ACCESS_KEY": KEY["secretAccessKey"],
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
}
api = boto3.client(
    "lambda-microvms",
    endpoint_url=URL,
    region_name="hh-local-1",
    aws_access_key_id=KEY["accessKeyId"],
    aws_secret_access_key=KEY["secretAccessKey"],
)

EXPECTED_TOOLS = {
    "create_sandbox", "list_sandboxes", "bash", "read_file", "write_file", "edit_file", "list_files", "glob",
    "upload", "download", "start_process", "read_process_output", "expose_port", "suspend", "resume", "fork", "terminate",
}


def text(r):
    return "".join(c.text for c in r.content if getattr(c, "type", "") == "text")


async def ok(c, name, args=None):
    r = await c.call_tool(name, args or {}, read_timeout_seconds=600)
    assert not r.is_error, f"{name}({args}) failed: {text(r)}"
    return text(r)


async def fails(c, name, args, needle):
    r = await c.call_tool(name, args, read_timeout_seconds=600)
    assert r.is_error, f"{name}({args}) should have failed, answered: {text(r)}"
    assert needle in text(r), f"{name}({args}): {needle!r} not in {text(r)!r}"
    return text(r)


async def check_tools(c):
    tools = {t.name: t for t in (await c.list_tools()).tools}
    assert EXPECTED_TOOLS <= set(tools), sorted(tools)
    for t in tools.values():
        assert t.description and len(t.description) > 40, (t.name, t.description)
        assert t.input_schema.get("type") == "object", (t.name, t.input_schema)
    bash = tools["bash"].input_schema
    assert bash["required"] == ["command"], bash
    assert {"command", "timeout_seconds", "cwd", "sandbox_id"} <= set(bash["properties"]), bash
    edit = tools["edit_file"].input_schema
    assert set(edit["required"]) == {"path", "new_string"}, edit
    assert {"old_string", "replace_all", "insert_line"} <= set(edit["properties"]), edit
    assert tools["expose_port"].input_schema["required"] == ["port"]


async def files_and_edits(c):
    await ok(c, "write_file", {"path": "pkg/calc.py", "content": "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"})
    out = await ok(c, "read_file", {"path": "/workspace/pkg/calc.py", "offset": 2, "limit": 1})
    assert out.startswith("     2\t    return a - b\n") and "offset=3" in out, out
    # Missing and ambiguous strings fail and leave the file as it was.
    await fails(c, "edit_file", {"path": "pkg/calc.py", "old_string": "return a * b", "new_string": "x"}, "not found")
    await fails(c, "edit_file", {"path": "pkg/calc.py", "old_string": "return a - b", "new_string": "return a + b"}, "appears 2 times")
    await ok(c, "edit_file", {"path": "pkg/calc.py", "old_string": "def add(a, b):\n    return a - b", "new_string": "def add(a, b):\n    return a + b"})
    await ok(c, "edit_file", {"path": "pkg/calc.py", "insert_line": 0, "new_string": '"""Arithmetic."""'})
    out = await ok(c, "bash", {"command": "python3 -c 'import pkg.calc as m; print(m.add(2, 3), m.sub(2, 3))'; head -1 pkg/calc.py"})
    assert "exit code: 0" in out and "5 -1" in out and '"""Arithmetic."""' in out, out
    await ok(c, "edit_file", {"path": "pkg/calc.py", "old_string": "(a, b)", "new_string": "(a, b=0)", "replace_all": True})
    assert (await ok(c, "bash", {"command": "grep -c 'b=0' pkg/calc.py"})).count("2") >= 1
    await ok(c, "write_file", {"path": "pkg/tests/test_calc.py", "content": "import pkg.calc\n"})
    out = await ok(c, "glob", {"pattern": "**/*.py"})
    assert out.split("\n") == ["/workspace/pkg/calc.py", "/workspace/pkg/tests/test_calc.py"], out
    assert "no files" in await ok(c, "glob", {"pattern": "**/*.rs"})
    listing = json.loads(await ok(c, "list_files", {"path": "pkg"}))
    assert {e["name"] for e in listing["entries"]} >= {"calc.py", "tests"}, listing
    await fails(c, "read_file", {"path": "/workspace/nope.txt"}, "ResourceNotFoundException")


async def commands(c):
    out = await ok(c, "bash", {"command": "echo out; echo err >&2; exit 3"})
    assert out.startswith("exit code: 3\n") and "--- stdout ---\nout\n" in out and "--- stderr ---\nerr\n" in out, out
    out = await ok(c, "bash", {"command": "pwd", "cwd": "/tmp"})
    assert "/tmp" in out, out
    out = await ok(c, "bash", {"command": "pwd", "cwd": "/no/such/dir"})
    assert "exit code: 125" in out and "no directory" in out, out
    out = await ok(c, "bash", {"command": "sleep 30", "timeout_seconds": 2})
    assert "timeout" in out, out
    # Long output: head and tail shown, the whole kept in a file the result names.
    out = await ok(c, "bash", {"command": "seq 1 200000"})
    assert "characters cut" in out and out.count("\n") < 20000, out[:500]
    assert "is in /tmp/hearth-mcp/" in out, out[-600:]
    saved = out.split("is in ")[1].split(";")[0].split("]")[0].strip()
    assert (await ok(c, "bash", {"command": f"wc -l < {saved}"})).endswith("200000\n"), saved


async def process_and_port(c):
    await ok(c, "write_file", {"path": "www/index.html", "content": "hello from the sandbox\n"})
    started = json.loads(await ok(c, "start_process", {"command": "echo starting; exec python3 -m http.server 8000 --bind 0.0.0.0", "cwd": "/workspace/www"}))
    pid = started["process_id"]
    out = await ok(c, "read_process_output", {"process_id": pid, "wait_seconds": 30})
    assert "running" in out and "starting" in out, out
    exposed = json.loads(await ok(c, "expose_port", {"port": 8000}))
    body = None
    for _ in range(60):
        try:
            req = urllib.request.Request(exposed["url"] + "index.html", headers=exposed["headers"])
            body = urllib.request.urlopen(req, timeout=30).read()
            break
        except (urllib.error.URLError, ConnectionError):
            await asyncio.sleep(1)
    assert body == b"hello from the sandbox\n", (body, exposed)
    try:
        urllib.request.urlopen(exposed["url"] + "index.html", timeout=30)
        raise AssertionError("the port answered without the token")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e
    out = await ok(c, "read_process_output", {"process_id": pid, "stop": True})
    assert "GET /index.html" in out and "stopped" in out, out
    out = await ok(c, "read_process_output", {"process_id": pid, "wait_seconds": 20})
    assert "running" not in out, out
    done = json.loads(await ok(c, "start_process", {"command": "echo done; exit 4"}))
    out = await ok(c, "read_process_output", {"process_id": done["process_id"], "wait_seconds": 30})
    for _ in range(10):
        if "exited" in out:
            break
        out = await ok(c, "read_process_output", {"process_id": done["process_id"], "wait_seconds": 5, "from_start": True})
    assert "exited with code 4" in out and "done" in out, out
    await fails(c, "read_process_output", {"process_id": "pNOSUCH"}, "no process")


async def malformed(c):
    await fails(c, "bash", {"command": 5}, "")
    await fails(c, "bash", {}, "")
    await fails(c, "read_file", {"path": ""}, "path is empty")
    await fails(c, "bash", {"command": "true", "sandbox_id": "mvm-00000000"}, "ResourceNotFoundException")
    await fails(c, "bash", {"command": "true", "sandbox_id": "../etc"}, "not a sandbox id")
    await fails(c, "glob", {"pattern": "a[b"}, "not a glob")
    await fails(c, "expose_port", {"port": 70000}, "")
    await fails(c, "bash", {"command": "true", "timeout_seconds": -1}, "timeout_seconds")


async def lifecycle(c, sid):
    listed = json.loads(await ok(c, "list_sandboxes"))
    assert any(s["sandbox_id"] == sid and s["current"] for s in listed["sandboxes"]), listed
    assert json.loads(await ok(c, "suspend"))["state"] in ("SUSPENDED", "SUSPENDING")
    assert api.get_microvm(microvmIdentifier=sid)["state"] == "SUSPENDED"
    await ok(c, "resume")
    assert "5" in await ok(c, "bash", {"command": "python3 -c 'import pkg.calc as m; print(m.add(2, 3))'"})
    # Fork: the daemon's extension, when this build has it; else its error reaches the model.
    r = await c.call_tool("fork", {}, read_timeout_seconds=600)
    if r.is_error:
        assert "fork" in text(r).lower(), text(r)
        return "error: " + text(r)[:200]
    else:
        fork = json.loads(text(r))["sandbox_id"]
        assert fork != sid
        out = await ok(c, "bash", {"command": "cat pkg/calc.py | head -1", "sandbox_id": fork})
        assert "Arithmetic" in out, out
        await ok(c, "terminate", {"sandbox_id": fork})
        return "ok"


def current_sandbox():
    live = [m for m in api.list_microvms()["items"] if m["state"] not in ("TERMINATED",)]
    return live


async def stdio():
    before = {m["microvmId"] for m in current_sandbox()}
    params = StdioServerParameters(command=HEARTH, args=["mcp"], env=ENV)
    async with Client(params) as c:
        await check_tools(c)
        assert json.loads(await ok(c, "list_sandboxes"))["sandboxes"] == [] or True
        out = await ok(c, "bash", {"command": "pwd; python3 --version"})
        assert out.startswith("exit code: 0\n") and "/workspace\n" in out and "Python 3" in out, out
        sid = [m["microvmId"] for m in current_sandbox() if m["microvmId"] not in before]
        assert len(sid) == 1, sid
        sid = sid[0]
        await files_and_edits(c)
        await commands(c)
        await process_and_port(c)
        await malformed(c)
        # Host files, both ways (stdio: the server runs on this host).
        with tempfile.TemporaryDirectory() as d:
            src, back = os.path.join(d, "in.bin"), os.path.join(d, "out.bin")
            data = os.urandom(300_000)
            open(src, "wb").write(data)
            await ok(c, "upload", {"host_path": src, "sandbox_path": "blob.bin"})
            await ok(c, "download", {"host_path": back, "sandbox_path": "/workspace/blob.bin"})
            assert open(back, "rb").read() == data
            await fails(c, "upload", {"host_path": "relative", "sandbox_path": "x"}, "absolute")
        forked = await lifecycle(c, sid)
    # The session ended: its sandbox is suspended (the default --on-exit).
    for _ in range(120):
        if api.get_microvm(microvmIdentifier=sid)["state"] == "SUSPENDED":
            break
        await asyncio.sleep(1)
    assert api.get_microvm(microvmIdentifier=sid)["state"] == "SUSPENDED"
    api.terminate_microvm(microvmIdentifier=sid)
    print(json.dumps({"stdio": "ok", "sandbox": sid, "fork": forked}))


async def http():
    token = "t0ken-" + os.urandom(8).hex()
    proc = subprocess.Popen(
        [HEARTH, "mcp", "--http", "127.0.0.1:0", "--token", token, "--on-exit", "terminate"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening http://"), line
        url = line.split(" ", 1)[1]
        for auth in (None, "Bearer wrong"):
            headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
            if auth:
                headers["Authorization"] = auth
            req = urllib.request.Request(url, data=b"{}", headers=headers)
            try:
                urllib.request.urlopen(req, timeout=30)
                raise AssertionError("served without the token")
            except urllib.error.HTTPError as e:
                assert e.code == 401, e
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=600) as hc:
            async with Client(streamable_http_client(url, http_client=hc)) as c:
                await check_tools(c)
                out = await ok(c, "bash", {"command": "echo over-http; pwd"})
                assert "over-http\n/workspace\n" in out, out
                sid = [s for s in json.loads(await ok(c, "list_sandboxes"))["sandboxes"] if s["current"]][0]["sandbox_id"]
                await ok(c, "write_file", {"path": "a.txt", "content": "one\ntwo\ntwo\n"})
                await fails(c, "edit_file", {"path": "a.txt", "old_string": "two", "new_string": "2"}, "appears 2 times")
                await fails(c, "upload", {"host_path": "/etc/hostname", "sandbox_path": "h"}, "host-files")
                await malformed(c)
                # A second session of the same server shares the sandbox.
                async with Client(streamable_http_client(url, http_client=hc)) as c2:
                    assert "one" in await ok(c2, "read_file", {"path": "a.txt"})
                # The sandbox terminated behind the session's back: the model hears so, and
                # the next call starts a new one.
                api.terminate_microvm(microvmIdentifier=sid)
                await fails(c, "bash", {"command": "true"}, "no longer exists")
                assert "again" in await ok(c, "bash", {"command": "echo again"})
                gone, sid = sid, [s for s in json.loads(await ok(c, "list_sandboxes"))["sandboxes"] if s["current"]][0]["sandbox_id"]
                assert sid != gone
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    # --on-exit terminate: gone with the server.
    assert api.get_microvm(microvmIdentifier=sid)["state"] == "TERMINATED"
    print(json.dumps({"http": "ok", "sandbox": sid}))


def signed(key, method, path, body=b"", token=None):
    """A SigV4-signed request to the daemon (botocore signs), as test_api.py's."""
    req = AWSRequest(method=method, url=URL + path, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(key["accessKeyId"], key["secretAccessKey"], token), "lambda", "us-east-1").add_auth(req)
    p = req.prepare()
    r = urllib.request.Request(p.url, data=body or None, method=method, headers=dict(p.headers))
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def mint(key, minutes=5, token=None):
    status, body = signed(key, "POST", "/hearth/v1/mcp-tokens", json.dumps({"expirationInMinutes": minutes}).encode(), token)
    assert status == 200, (status, body)
    return json.loads(body)


def raw_post(url, headers):
    """A JSON-RPC POST with `headers`: (status, body)."""
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=h), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def forged(claims):
    """A token of `claims` signed with the daemon's own token key (an expired one, say)."""
    key = open(os.path.join(os.environ["HEARTH_STATE"], "token.key"), "rb").read()
    body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return body + "." + hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


async def daemon():
    """`hearth serve`'s own MCP server at /mcp, opened by tokens from the mcp-tokens extension."""
    key_b = json.loads(os.environ["HEARTH_KEY_B"])
    assert key_b["account"] != KEY["account"]
    minted = mint(KEY)
    assert minted["url"] == URL + "/mcp" and minted["expiresAt"] > 0, minted
    token = minted["token"]
    for bad in (0, 1441, "x", -1):
        status, body = signed(KEY, "POST", "/hearth/v1/mcp-tokens", json.dumps({"expirationInMinutes": bad}).encode())
        assert status == 400 and b"expirationInMinutes" in body, (bad, status, body)
    # Role sessions cannot mint a token that would outlive them.
    sys.path.insert(0, os.path.dirname(__file__))
    from roles import ensure_role
    role = ensure_role(KEY, URL, "mcp-minter", {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "lambda:*", "Resource": "*"}]})
    sts = boto3.client("sts", endpoint_url=URL, region_name="hh-local-1",
                       aws_access_key_id=KEY["accessKeyId"], aws_secret_access_key=KEY["secretAccessKey"])
    creds = sts.assume_role(RoleArn=role, RoleSessionName="mcp")["Credentials"]
    session = {"accessKeyId": creds["AccessKeyId"], "secretAccessKey": creds["SecretAccessKey"]}
    status, body = signed(session, "POST", "/hearth/v1/mcp-tokens", b"{}", creds["SessionToken"])
    assert status == 403 and b"outlive" in body, (status, body)
    # Without a valid bearer token: 401 with a JSON message saying how to get one.
    url = URL + "/mcp"
    now = int(__import__("time").time())
    expired = forged({"a": KEY["account"], "m": KEY["accessKeyId"], "e": now - 5, "p": [], "k": "mcp"})
    wrong_scope = forged({"a": KEY["account"], "m": KEY["accessKeyId"], "e": now + 300, "p": []})
    tampered = token.split(".")[0][:-2] + "AA." + token.split(".")[1]
    for headers, needle in (({}, b"missing bearer token"), ({"Authorization": "Bearer wrong"}, b"token"),
                            ({"Authorization": "Bearer " + tampered}, b"token"),
                            ({"Authorization": "Bearer " + expired}, b"expired token"),
                            ({"Authorization": "Bearer " + wrong_scope}, b"does not open"),
                            ({"Authorization": "Basic " + token}, b"not a bearer token")):
        status, body = raw_post(url, headers)
        assert status == 401 and needle in body and "hearth mcp token" in json.loads(body)["message"], (headers, status, body)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=600) as hc:
        async with Client(streamable_http_client(url, http_client=hc)) as c:
            await check_tools(c)
            out = await ok(c, "bash", {"command": "echo hi; pwd"})
            assert out.startswith("exit code: 0\n") and "hi\n/workspace\n" in out, out
            sid = [s for s in json.loads(await ok(c, "list_sandboxes"))["sandboxes"] if s["current"]][0]["sandbox_id"]
            await ok(c, "write_file", {"path": "a.py", "content": "x = 1\ny = 1\n"})
            await fails(c, "edit_file", {"path": "a.py", "old_string": " = 1", "new_string": " = 2"}, "appears 2 times")
            await ok(c, "edit_file", {"path": "a.py", "old_string": "y = 1", "new_string": "y = 2"})
            assert "1 2" in await ok(c, "bash", {"command": "python3 -c 'import a; print(a.x, a.y)'"})
            # The daemon's host files are not the tenant's.
            await fails(c, "upload", {"host_path": "/etc/hostname", "sandbox_path": "h"}, "host-files")
            # /mcp on the sandbox's own host is its app's, never the daemon's MCP server.
            await ok(c, "write_file", {"path": "www/mcp", "content": "the app's /mcp\n"})
            await ok(c, "start_process", {"command": "exec python3 -m http.server 8080 --bind 127.0.0.1", "cwd": "/workspace/www"})
            host = api.get_microvm(microvmIdentifier=sid)["endpoint"]
            ep_token = api.create_microvm_auth_token(microvmIdentifier=sid, expirationInMinutes=5, allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
            got = None
            for _ in range(60):
                try:
                    req = urllib.request.Request(url, headers={"Host": host, "X-aws-proxy-auth": ep_token, "Authorization": f"Bearer {token}"})
                    got = urllib.request.urlopen(req, timeout=30).read()
                    break
                except (urllib.error.URLError, ConnectionError):
                    await asyncio.sleep(1)
            assert got == b"the app's /mcp\n", got
            # An endpoint token opens no MCP server, an MCP token no endpoint.
            assert raw_post(url, {"Authorization": "Bearer " + ep_token})[0] == 401
            req = urllib.request.Request(URL + f"/microvms/{sid}/mcp", headers={"X-aws-proxy-auth": token})
            try:
                urllib.request.urlopen(req, timeout=30)
                raise AssertionError("an MCP token opened an endpoint")
            except urllib.error.HTTPError as e:
                assert e.code == 403, e
        # Tenant B's token: B's sandboxes only; A's is not found.
        token_b = mint(key_b)["token"]
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token_b}"}, timeout=600) as hb:
            async with Client(streamable_http_client(url, http_client=hb)) as c:
                assert json.loads(await ok(c, "list_sandboxes"))["sandboxes"] == []
                await fails(c, "bash", {"command": "echo hi", "sandbox_id": sid}, "ResourceNotFoundException")
                await fails(c, "read_file", {"path": "/workspace/a.py", "sandbox_id": sid}, "ResourceNotFoundException")
        # A's token again (a new protocol session of the same token): the same sandbox.
        async with Client(streamable_http_client(url, http_client=hc)) as c:
            assert "y = 2" in await ok(c, "read_file", {"path": "a.py"})
    api.terminate_microvm(microvmIdentifier=sid)
    print(json.dumps({"daemon": "ok", "sandbox": sid}))


if __name__ == "__main__":
    asyncio.run({"stdio": stdio, "http": http, "daemon": daemon}[sys.argv[1]]())
