"""Traffic into microvms through a running `hearth serve`: the endpoint (HTTP/1.1, HTTP/2,
streaming bodies, SSE, WebSocket, 1,000 concurrent connections, an app that never
answers) and shells (a PTY over a WebSocket).

Run by crates/cli/tests/ingress.rs with HEARTH_URL, HEARTH_KEY_A, HEARTH_CTX_NET (the app's
build context) and HEARTH_DAEMON_PID in the environment. Helpers come from test_api.py.
"""
import asyncio
import collections
import hashlib
import json
import os
import resource
import subprocess
import threading
import time
import urllib.parse

import websocket

from test_api import DEBIAN, KEY_A, ROLE, client, expect_error, http_get, wait_version

CTX = os.environ["HEARTH_CTX_NET"]
DAEMON = int(os.environ["HEARTH_DAEMON_PID"])


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def one_request(host, port, path, token):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
        w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-aws-proxy-auth: {token}\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 90)
        w.close()
        return int(line.split()[1])
    except Exception as e:  # noqa: BLE001 - the kind of failure is the result
        return type(e).__name__


async def flood(host, port, path, token, n):
    return await asyncio.gather(*[one_request(host, port, path, token) for _ in range(n)])


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


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    a = client(KEY_A)
    a.create_microvm_image(name="net", baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX},
                           hooks={"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 120}})
    v = wait_version(a, "net", "1")
    assert v["state"] == "SUCCESSFUL", v
    mid = a.run_microvm(imageIdentifier="net", ingressNetworkConnectors=["SHELL_INGRESS"])["microvmId"]
    plain = a.run_microvm(imageIdentifier="net")["microvmId"]
    token = a.create_microvm_auth_token(microvmIdentifier=mid, expirationInMinutes=5,
                                        allowedPorts=[{"range": {"startPort": 8080, "endPort": 8081}}])["authToken"]["X-aws-proxy-auth"]
    auth = {"X-aws-proxy-auth": token}
    endpoint = a.get_microvm(microvmIdentifier=mid)["endpoint"]
    u = urllib.parse.urlsplit(endpoint)
    ws_endpoint = "ws://" + u.netloc + u.path

    # An app port that accepts and never answers: the endpoint gives up after 60 s (504).
    # Runs in the background while the rest goes on.
    hang = {}

    def hang_request():
        t0 = time.time()
        hang["status"] = http_get(endpoint + "/", dict(auth, **{"X-aws-proxy-port": "8081"}))[0]
        hang["secs"] = time.time() - t0

    hanging = threading.Thread(target=hang_request)
    hanging.start()

    # HTTP/1.1, with the Host the client sent.
    assert http_get(endpoint + "/ready", auth) == (200, b"ok\n")
    assert http_get(endpoint + "/host", auth) == (200, u.netloc.encode())
    # HTTP/2 (prior knowledge, as gRPC and modern clients speak it).
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", f"X-aws-proxy-auth: {token}",
                          "-w", "|%{http_version}", endpoint + "/host"], capture_output=True, text=True, timeout=60)
    assert out.stdout == u.netloc + "|2", (out.stdout, out.stderr)
    # Streaming bodies both ways: 8 MiB up, hashed by the app; 8 MiB down.
    blob = os.urandom(8 << 20)
    r = subprocess.run(["curl", "-sS", "-H", f"X-aws-proxy-auth: {token}", "-H", "Content-Type: application/octet-stream",
                        "--data-binary", "@-", endpoint + "/hash"], input=blob, capture_output=True, timeout=120)
    assert r.stdout.decode() == f"{len(blob)} {hashlib.sha256(blob).hexdigest()}", r
    status, body = http_get(endpoint + "/big", auth)
    assert status == 200 and body == b"x" * (8 << 20), (status, len(body))
    # Server-sent events arrive as the app sends them, not at the end.
    p = subprocess.Popen(["curl", "-sSN", "-H", f"X-aws-proxy-auth: {token}", endpoint + "/sse"], stdout=subprocess.PIPE)
    events = []
    for line in p.stdout:
        if line.startswith(b"data:"):
            events.append((time.time(), line.strip()))
    p.wait(timeout=30)
    assert [e[1] for e in events] == [b"data: tick 0", b"data: tick 1", b"data: tick 2"], events
    assert events[2][0] - events[0][0] >= 1.5, f"events were buffered: {events}"

    # WebSocket through the endpoint, text (UTF-8) and binary; refused without a good token.
    ws = websocket.create_connection(ws_endpoint + "/ws", header=[f"X-aws-proxy-auth: {token}"], timeout=30)
    ws.send("h\u00e9llo \u2713")
    assert ws.recv() == "echo:h\u00e9llo \u2713"
    payload = bytes(range(256)) * 300
    ws.send_binary(payload)
    assert ws.recv() == b"echo:" + payload
    ws.close()
    for headers in ([], [f"X-aws-proxy-auth: {token[:-2]}00"]):
        try:
            websocket.create_connection(ws_endpoint + "/ws", header=headers, timeout=30)
            raise AssertionError("a WebSocket without a valid token was accepted")
        except websocket.WebSocketBadStatusException as e:
            assert e.status_code == 403, e

    # 1,000 concurrent connections to one microvm: bounded (the app never sees more than
    # 192 at once), the rest refused at once, every one answered, no descriptor kept.
    before = fds(DAEMON)
    results = asyncio.run(flood(u.hostname, u.port, u.path + "/hold", token, 1000))
    counts = collections.Counter(results)
    assert set(counts) <= {200, 429}, counts
    assert counts[200] >= 100 and counts[429] >= 1, counts
    peak = json.loads(http_get(endpoint + "/stats", auth)[1])["peak"]
    assert 1 <= peak <= 192, (peak, counts)
    deadline = time.time() + 20
    while fds(DAEMON) > before + 8 and time.time() < deadline:
        time.sleep(0.5)
    assert fds(DAEMON) <= before + 8, f"the daemon holds {fds(DAEMON)} descriptors, {before} before the flood"
    assert http_get(endpoint + "/ready", auth) == (200, b"ok\n")
    print("flood:", dict(counts), "peak", peak, flush=True)

    # Shells: a PTY over a WebSocket, with the size asked for, resizes, signals, UTF-8
    # and the exit status.
    expect_error("ValidationException", 400, a.create_microvm_shell_auth_token, microvmIdentifier=plain, expirationInMinutes=5)
    shell_token = a.create_microvm_shell_auth_token(microvmIdentifier=mid, expirationInMinutes=5)["authToken"]["X-aws-proxy-auth"]
    shell_url = f"ws://{u.netloc}/shell/{mid}"
    # Each token opens only its own door.
    assert http_get(endpoint + "/ready", {"X-aws-proxy-auth": shell_token})[0] == 403
    for headers in ([], [f"X-aws-proxy-auth: {token}"]):
        try:
            websocket.create_connection(shell_url, header=headers, timeout=30)
            raise AssertionError("a shell opened without a shell token")
        except websocket.WebSocketBadStatusException as e:
            assert e.status_code == 403, e
    try:
        websocket.create_connection(f"ws://{u.netloc}/shell/{plain}", header=[f"X-aws-proxy-auth: {shell_token}"], timeout=30)
        raise AssertionError("a shell token opened another microvm")
    except websocket.WebSocketBadStatusException as e:
        assert e.status_code == 403, e
    try:
        websocket.create_connection(shell_url + "?rows=0", header=[f"X-aws-proxy-auth: {shell_token}"], timeout=30)
        raise AssertionError("a zero-row terminal was accepted")
    except websocket.WebSocketBadStatusException as e:
        assert e.status_code == 400, e
    sh = websocket.create_connection(shell_url + "?rows=30&cols=90", header=[f"X-aws-proxy-auth: {shell_token}"], timeout=60)
    sh.send_binary(b"stty size; tty; echo m$((2+3))\n")
    out = read_until(sh, b"m5\r\n")
    assert b"30 90\r\n" in out and b"/dev/pts/" in out, out
    sh.send(json.dumps({"resize": {"rows": 40, "cols": 120}}))
    sh.send_binary(b"stty size; echo r$((2+4))\n")
    assert b"40 120\r\n" in read_until(sh, b"r6\r\n")
    sh.send_binary(b"sleep 1000; echo never$((0))\n")
    read_until(sh, b"never$((0))\r\n")
    time.sleep(0.5)
    sh.send(json.dumps({"signal": "INT"}))
    sh.send_binary(b"echo back$((1+1))\n")
    assert b"never0" not in read_until(sh, b"back2\r\n")
    sh.send_binary("echo 'h\u00e9llo \u2713' | wc -m\n".encode())
    out = read_until(sh, b"8\r\n")
    assert "h\u00e9llo \u2713" in out.decode("utf-8"), out
    sh.send('{"signal": "BOGUS"}')
    op, data = sh.recv_data()
    while op == websocket.ABNF.OPCODE_BINARY:
        op, data = sh.recv_data()
    assert op == websocket.ABNF.OPCODE_TEXT and b"unknown signal" in data, data
    sh.send_binary(b"exit 3\n")
    while True:
        op, data = sh.recv_data()
        if op == websocket.ABNF.OPCODE_TEXT:
            assert json.loads(data) == {"exit": {"code": 3, "signal": None}}, data
            break
    # Browsers cannot set WebSocket headers: the token may come as a subprotocol.
    sh = websocket.create_connection(shell_url, subprotocols=["hearth-shell", "hearth-token." + shell_token], timeout=60)
    assert sh.getsubprotocol() == "hearth-shell", sh.getsubprotocol()
    sh.send_binary(b"echo sp$((1+1))\n")
    read_until(sh, b"sp2\r\n")
    sh.close()
    # A shell whose WebSocket just goes away leaves nothing running.
    sh = websocket.create_connection(shell_url, header=[f"X-aws-proxy-auth: {shell_token}"], timeout=60)
    sh.send_binary(b"sleep 4242 &\necho started$((1))\n")
    read_until(sh, b"started1\r\n")
    sh.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        status, body = http_get(endpoint + "/procs", auth)
        if b"sleep 4242" not in body:
            break
        time.sleep(0.5)
    assert b"sleep 4242" not in body, body

    hanging.join()
    assert hang["status"] == 504 and 55 <= hang["secs"] < 90, hang
    print(json.dumps({"shell": mid}))


if __name__ == "__main__":
    main()
