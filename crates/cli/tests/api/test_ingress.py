"""Traffic into microvms through a running `hearth serve`: the endpoint (HTTP/1.1, HTTP/2,
streaming bodies, SSE, WebSocket, 1,000 concurrent connections, an app that never
answers) and shells (a PTY over a WebSocket); the endpoint by host name over TLS and the
service's shell protocol, driven by `requests` and `websockets` code written as the
service's users write it (`published_clients`); the origin rule (`origin_rule`).

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

import re
import socket

import requests
import websocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from test_api import DEBIAN, KEY_A, ROLE, URL, client, expect_error, http_get, read_until, signed, wait_version

CTX = os.environ["HEARTH_CTX_NET"]
DAEMON = int(os.environ["HEARTH_DAEMON_PID"])
# The CA `hearth serve` made for its endpoints, trusted the way users trust one: by the
# environment, not by the client code (requests reads REQUESTS_CA_BUNDLE, Python's ssl
# SSL_CERT_FILE).
CA = os.path.join(os.environ["HEARTH_STATE"], "tls", "localhost", "ca.pem")
os.environ["REQUESTS_CA_BUNDLE"] = CA
os.environ["SSL_CERT_FILE"] = CA
_getaddrinfo = socket.getaddrinfo


def _loopback_localhost(host, *args, **kwargs):
    """`*.localhost` is loopback (RFC 6761), as browsers, curl and systemd-resolved have it;
    this machine's glibc resolver does not, so the test does what such a resolver does."""
    if isinstance(host, str) and host.endswith(".localhost"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_localhost


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
    # The path form, under the daemon's URL (the host form: published_clients).
    endpoint = f"{URL}/microvms/{mid}"
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

    # Fresh tokens: the ones above may be near their five minutes on a slow host.
    token = a.create_microvm_auth_token(microvmIdentifier=mid, expirationInMinutes=10,
                                        allowedPorts=[{"range": {"startPort": 8080, "endPort": 8081}}])["authToken"]["X-aws-proxy-auth"]
    shell_token = a.create_microvm_shell_auth_token(microvmIdentifier=mid, expirationInMinutes=10)["authToken"]["X-aws-proxy-auth"]
    published_clients(a, mid, token, shell_token)
    origin_rule(a, mid, token)
    browser_links(a, mid)

    hanging.join()
    assert hang["status"] == 504 and 55 <= hang["secs"] < 90, hang
    print(json.dumps({"shell": mid}))


def wait_for(ws, marker, timeout=60):
    """Shell output until `marker`, text or binary messages alike (as published clients read)."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        chunk = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        data += chunk.encode() if isinstance(chunk, str) else chunk
    return data


def published_clients(a, mid, token, shell_token):
    """The endpoint as the service's users reach it: GetMicrovm's `endpoint` is a bare host
    (no scheme, no trailing slash); HTTP goes to "https://" + endpoint, WebSockets to
    "wss://" + endpoint, the token in X-aws-proxy-auth or, as browsers must, in the
    subprotocols; the shell at "wss://" + endpoint + "/shell"."""
    endpoint = a.get_microvm(microvmIdentifier=mid)["endpoint"]
    assert re.fullmatch(rf"{mid}\.localhost:\d+", endpoint), endpoint
    auth = {"X-aws-proxy-auth": token}
    r = requests.get("https://" + endpoint + "/ready", headers=auth, timeout=60)
    assert (r.status_code, r.text) == (200, "ok\n"), (r.status_code, r.text)
    # The app sees its own host and the scheme, so its absolute links work.
    assert requests.get("https://" + endpoint + "/host", headers=auth, timeout=60).text == endpoint
    assert requests.get("https://" + endpoint + "/link", headers=auth, timeout=60).text == f"https://{endpoint}/next"
    assert requests.get("https://" + endpoint + "/ready", timeout=60).status_code == 403
    assert requests.get("https://" + endpoint + "/ready", headers=dict(auth, **{"X-aws-proxy-port": "9999"}), timeout=60).status_code == 403
    # Another microvm's host does not take this microvm's token.
    other = endpoint.replace(mid, "mvm-0000000000000000")
    assert requests.get("https://" + other + "/ready", headers=auth, timeout=60).status_code == 403
    # A TLS-terminating proxy in front forwards to the plain listener with the Host kept.
    r = requests.get(URL + "/host", headers=dict(auth, Host=endpoint), timeout=60)
    assert (r.status_code, r.text) == (200, endpoint), (r.status_code, r.text)
    # Server-sent events as they come.
    events = []
    with requests.get("https://" + endpoint + "/sse", headers=auth, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                events.append((time.time(), line))
    assert [e[1] for e in events] == [b"data: tick 0", b"data: tick 1", b"data: tick 2"], events
    assert events[2][0] - events[0][0] >= 1.5, f"events were buffered: {events}"
    # HTTP/2 over TLS (ALPN h2, as gRPC clients speak it); curl trusts the CA by flag.
    out = subprocess.run(["curl", "-sS", "--cacert", CA, "--http2", "-H", f"X-aws-proxy-auth: {token}",
                          "-w", "|%{http_version}", "https://" + endpoint + "/host"], capture_output=True, text=True, timeout=60)
    assert out.stdout == endpoint + "|2", (out.stdout, out.stderr)
    # WebSockets: the token in a header, or (browsers) the service's subprotocols; the app
    # never sees those, and the handshake answers `lambda-microvms` when the app picks none.
    with connect("wss://" + endpoint + "/ws", additional_headers=auth, compression=None) as ws:
        ws.send("h\u00e9llo")
        assert ws.recv(timeout=30) == "echo:h\u00e9llo"
    protocols = ["lambda-microvms", "lambda-microvms.authentication." + token, "lambda-microvms.port.8080", "chat.v1"]
    with connect("wss://" + endpoint + "/wsp", subprotocols=protocols, compression=None) as ws:
        assert ws.subprotocol == "lambda-microvms", ws.subprotocol
        assert ws.recv(timeout=30) == "protocols:chat.v1"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=30) == b"echo:\x00\x01"
    try:
        connect("wss://" + endpoint + "/ws", subprotocols=["lambda-microvms", "lambda-microvms.authentication." + token[:-2] + "00"])
        raise AssertionError("a WebSocket with a forged token was accepted")
    except InvalidStatus as e:
        assert e.response.status_code == 403, e
    # The service's shell protocol: wss://<endpoint>/shell with the shell token as a
    # subprotocol (and a port subprotocol, ignored), as its published clients write it.
    with connect("wss://" + endpoint + "/shell", subprotocols=[
            "lambda-microvms.authentication." + shell_token, "lambda-microvms", "lambda-microvms.port.8022"], compression=None) as ws:
        assert ws.subprotocol == "lambda-microvms", ws.subprotocol
        ws.send(b"stty -echo; printf '\\nSVC%s\\n' READY\r")
        wait_for(ws, b"\r\nSVCREADY\r\n")
        ws.send(b"exit\r")
    # ... and at the endpoint's root with the token in the header (another client's form).
    with connect("wss://" + endpoint, additional_headers={"X-aws-proxy-auth": shell_token}, compression=None) as ws:
        ws.send(b"echo root$((2+2))\r")
        wait_for(ws, b"root4")
    # An endpoint token at /shell reaches the app (which has no /shell), never a shell.
    try:
        connect("wss://" + endpoint + "/shell", additional_headers=auth)
        raise AssertionError("an endpoint token opened a shell")
    except InvalidStatus as e:
        assert e.response.status_code == 404, e
    # Hearth's own shell address stays as an alias (the CLI's; test above).
    print("published clients: ok", flush=True)


def origin_rule(a, mid, token):
    """Tenants' apps run JavaScript in users' browsers: the API shares no origin (and, by
    default, no site) with any endpoint, answers no CORS that would let an endpoint's page
    read it, and the path form, which every microvm shares, carries no cookies."""
    endpoint = a.get_microvm(microvmIdentifier=mid)["endpoint"]
    page = "https://" + endpoint
    api_tls = "https://127.0.0.1:" + endpoint.rsplit(":", 1)[1]
    for api in (URL, api_tls):
        # A page of the microvm asking the API (a preflight, then the request itself).
        r = requests.options(api + "/2025-09-09/microvms", headers={
            "Origin": page, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-amz-date"}, timeout=60)
        assert not any(h.lower().startswith("access-control-") for h in r.headers), (api, r.status_code, dict(r.headers))
        r = requests.get(api + "/2025-09-09/microvms", headers={"Origin": page}, timeout=60)
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers, (api, r.status_code, dict(r.headers))
    # The endpoint's host is never the API's: the API's paths there go to the app.
    r = requests.get(page + "/2025-09-09/microvms", headers={"X-aws-proxy-auth": token}, timeout=60)
    assert r.status_code == 404 and b"Error response" in r.content, (r.status_code, r.content)
    # The path form strips cookies both ways; the host form, an origin of its own, keeps them.
    path = f"{URL}/microvms/{mid}/cookie"
    r = requests.get(path, headers={"X-aws-proxy-auth": token, "Cookie": "api=secret"}, timeout=60)
    assert (r.status_code, r.text) == (200, "") and "Set-Cookie" not in r.headers, (r.status_code, r.text, dict(r.headers))
    r = requests.get(page + "/cookie", headers={"X-aws-proxy-auth": token, "Cookie": "app=0"}, timeout=60)
    assert (r.status_code, r.text) == (200, "app=0") and r.headers.get("Set-Cookie") == "app=1; Path=/", (r.text, dict(r.headers))
    print("origin rule: ok", flush=True)


def browser_links(a, mid):
    """`hearth url`: a link a browser can open, exchanged on the microvm's own host for an
    HttpOnly, host-only cookie that the app never sees, refused everywhere else."""
    def link(port=8080, minutes=5, of=mid):
        status, body = signed(KEY_A, "POST", f"/hearth/v1/microvms/{of}/link",
                              json.dumps({"port": port, "expirationInMinutes": minutes}).encode())
        assert status == 200, (status, body)
        return json.loads(body)
    v = link()
    url = urllib.parse.urlsplit(v["url"])
    assert url.scheme == "https" and url.hostname == f"{mid}.localhost" and url.path == "/", v
    token = urllib.parse.parse_qs(url.query)["hearth-link"][0]
    # Opening it: 303 to the same place without the token, with the cookie.
    r = requests.get(v["url"].replace("/?", "/cookie?keep=1&"), allow_redirects=False, timeout=60)
    assert r.status_code == 303 and r.headers["Location"] == "/cookie?keep=1", (r.status_code, dict(r.headers))
    set_cookie = r.headers["Set-Cookie"]
    name, value = set_cookie.split(";", 1)[0].split("=", 1)
    attrs = [x.strip().lower() for x in set_cookie.split(";")[1:]]
    assert name == "__Host-hearth-auth", set_cookie
    for want in ("httponly", "secure", "path=/", "samesite=lax"):
        assert want in attrs, (want, set_cookie)
    assert not any(x.startswith("domain") for x in attrs), set_cookie  # host-only
    # With the cookie (as the browser sends it back), the app answers and never sees it.
    base = f"https://{url.netloc}"
    r = requests.get(base + "/cookie", headers={"Cookie": f"app=0; {name}={value}"}, timeout=60)
    assert (r.status_code, r.text) == (200, "app=0"), (r.status_code, r.text)
    r = requests.get(base + "/cookie", headers={"Cookie": f"{name}={value}"}, timeout=60)
    assert (r.status_code, r.text) == (200, ""), (r.status_code, r.text)
    # A link makes one cookie: opened again it only lets a browser holding it through.
    r = requests.get(v["url"], allow_redirects=False, timeout=60)
    assert r.status_code == 403 and "Set-Cookie" not in r.headers, (r.status_code, dict(r.headers))
    r = requests.get(v["url"], headers={"Cookie": f"{name}={value}"}, allow_redirects=False, timeout=60)
    assert r.status_code == 303 and "Set-Cookie" not in r.headers, (r.status_code, dict(r.headers))
    # Refused: no cookie; the cookie on the path form (the daemon's origin) and as a header
    # token; the link token as a header token or on the path form; a garbage link; another
    # microvm's link on this host; port 0.
    assert requests.get(base + "/cookie", timeout=60).status_code == 403
    r = requests.get(f"{URL}/microvms/{mid}/cookie", headers={"Cookie": f"hearth-auth={value}"}, timeout=60)
    assert r.status_code == 403, r.status_code
    for t in (value, token):
        assert requests.get(base + "/cookie", headers={"X-aws-proxy-auth": t}, timeout=60).status_code == 403
    r = requests.get(f"{URL}/microvms/{mid}/cookie?hearth-link={token}", allow_redirects=False, timeout=60)
    assert r.status_code == 403 and "Set-Cookie" not in r.headers, (r.status_code, dict(r.headers))
    r = requests.get(base + "/?hearth-link=forged.0000", allow_redirects=False, timeout=60)
    assert r.status_code == 403 and "Set-Cookie" not in r.headers, r.status_code
    other = a.run_microvm(imageIdentifier="net")["microvmId"]
    try:
        theirs = urllib.parse.urlsplit(link(of=other)["url"])
        r = requests.get(f"{base}/?{theirs.query}", allow_redirects=False, timeout=60)
        assert r.status_code == 403 and "Set-Cookie" not in r.headers, r.status_code
        # This microvm's cookie does not open the other's host.
        r = requests.get(f"https://{theirs.netloc}/cookie", headers={"Cookie": f"{name}={value}"}, timeout=60)
        assert r.status_code == 403, r.status_code
    finally:
        a.terminate_microvm(microvmIdentifier=other)
    status, body = signed(KEY_A, "POST", f"/hearth/v1/microvms/{mid}/link", b'{"port": 0}')
    assert status == 400, (status, body)
    status, body = signed(KEY_A, "POST", "/hearth/v1/microvms/mvm-nope/link", b"{}")
    assert status == 404, (status, body)
    print("browser links: ok", flush=True)


if __name__ == "__main__":
    main()
