"""The origin rule in a real browser: headless Chromium loads a page from a microvm's
endpoint, `https://<id>.localhost:<port>/`, with the daemon's CA trusted as a user trusts
it (an NSS database in the browser's own HOME), and the page's JavaScript tries to read
the API (fetch and XHR with credentials, plain and TLS listener), a cookie of the API's
host, and another microvm's endpoint; it reads its own origin as the control and writes
its findings into the DOM (`origin_page.html`). The same page then loads through the path
form, `<daemon>/microvms/<id>/`, which shares the daemon's origin.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no
port for other local users to reach), in a network namespace of its own (`own_network`)
whose loopback ports are carried to the daemon's (`relay`). Browsers cannot send
`X-aws-proxy-auth` on a page load, and Hearth has no browser sign-in yet, so the test
adds the header the way an authenticating proxy would, with DevTools' Fetch domain, and
only to requests for the microvm it belongs to (each microvm's token on its own host and
path form; nothing on requests to the API). DevTools also reports what the page cannot
see: why a request failed (CORS), the cookies sent or withheld, and `Sec-Fetch-Site`.

Run by crates/cli/tests/browser.rs with HEARTH_URL, HEARTH_KEY_A, HEARTH_CTX_PAGE (the
app's build context), HEARTH_STATE and HEARTH_BROWSER_TMP (Chromium's HOME and profile)
in the environment. Helpers come from test_api.py.
"""
import ctypes
import fcntl
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse

from test_api import KEY_A, MINIMAL, ROLE, URL, client, wait_version

CTX = os.environ["HEARTH_CTX_PAGE"]
TMP = os.environ["HEARTH_BROWSER_TMP"]
CA = os.path.join(os.environ["HEARTH_STATE"], "tls", "localhost", "ca.pem")
CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)


def own_network():
    """(In the browser's process, before exec.) A network namespace of its own with its
    loopback up. Chromium drops every connection, loopback ones included, with
    ERR_NETWORK_CHANGED whenever an address comes or goes on any interface it sees, and
    every microvm adds a veth to the host (this test's, and other tests' running beside
    it): in a namespace of its own it sees none of them."""
    if LIBC.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    with socket.socket() as s:
        # SIOCSIFFLAGS on `lo`: IFF_UP | IFF_LOOPBACK | IFF_RUNNING.
        fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", 0x1 | 0x8 | 0x40))


def relay(pid, ports):
    """Listens on 127.0.0.1:<port> in the network namespace of process `pid`, for each
    port, and carries each connection's bytes to and from 127.0.0.1:<port> here: the
    browser reaches the daemon at the very addresses (so origins) it has, through plain
    TCP it cannot tell apart. Returns the listeners."""
    theirs = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    listeners = []

    def listen_there():
        # setns moves only this thread, which ends here; its sockets stay where they were made.
        if LIBC.setns(theirs, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        listeners.extend(socket.create_server(("127.0.0.1", p)) for p in ports)

    t = threading.Thread(target=listen_there)
    t.start()
    t.join()
    os.close(theirs)
    assert len(listeners) == len(ports), "could not listen in the browser's network namespace"

    def pump(src, dst):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def accept(listener, port):
        while True:
            try:
                inner, _ = listener.accept()
            except OSError:
                return
            outer = socket.create_connection(("127.0.0.1", port), timeout=60)
            outer.settimeout(None)
            for src, dst in ((inner, outer), (outer, inner)):
                threading.Thread(target=pump, args=(src, dst), daemon=True).start()

    for listener, port in zip(listeners, ports):
        threading.Thread(target=accept, args=(listener, port), daemon=True).start()
    return listeners


class Chromium:
    """A headless Chromium on a DevTools pipe, killed (its whole process group) by `close`."""

    def __init__(self, tokens, ports):
        # (URL prefix, token): the header added to requests under each prefix.
        self.tokens = tokens
        home = os.path.join(TMP, "home")
        nssdb = os.path.join(home, ".pki", "nssdb")
        os.makedirs(nssdb)
        # The daemon's CA as a user trusts it: Chromium on Linux reads trust anchors from
        # $HOME/.pki/nssdb. Nothing else is trusted that way, and no flag skips checks.
        subprocess.run(["certutil", "-N", "-d", "sql:" + nssdb, "--empty-password"], check=True, timeout=60)
        subprocess.run(["certutil", "-A", "-d", "sql:" + nssdb, "-n", "hearth-test-ca", "-t", "C,,", "-i", CA], check=True, timeout=60)
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        # Moved above fd 4 first, so that putting them at 3 and 4 in the child (where
        # --remote-debugging-pipe expects them) cannot overwrite one with the other.
        hi_r, hi_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)

        def child():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)
            own_network()

        args = [
            "chromium", "--headless", f"--user-data-dir={os.path.join(TMP, 'profile')}", "--remote-debugging-pipe",
            # Tests run as root, and Chromium refuses to start its sandbox as root.
            "--no-sandbox",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-gpu", "about:blank",
        ]
        self.log = open(os.path.join(TMP, "chromium.log"), "wb")
        # Chromium makes a directory in TMPDIR for its profile's singleton socket, which a
        # killed browser leaves behind: into the test's directory with the rest.
        self.proc = subprocess.Popen(args, env=dict(os.environ, HOME=home, TMPDIR=TMP), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=child, pass_fds=(3, 4), start_new_session=True)
        for fd in (to_r, from_w, hi_r, hi_w):
            os.close(fd)
        self.inbox = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 0
        self.events = []
        self.listeners = []
        # The daemon's ports, in the browser's namespace (its first connection comes later:
        # when the test navigates).
        try:
            self.listeners = relay(self.proc.pid, ports)
        except BaseException:
            self.close()
            raise

    def close(self):
        # The browser's children (renderer, GPU, network) share its process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        for listener in self.listeners:
            listener.close()
        os.close(self.to_w)
        self.log.close()

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self.from_r, 1 << 16)
            if not chunk:
                self.inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.inbox.put(json.loads(msg))

    def send(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.to_w, data):]
        return self.next_id

    def call(self, method, params=None, session=None, timeout=90):
        """Sends a command and waits for its answer, handling events meanwhile."""
        want = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{method}: no answer from Chromium in {timeout}s; see {self.log.name}"
            msg = self.inbox.get(timeout=left)
            assert msg is not None, f"Chromium closed the pipe; see {self.log.name}"
            if msg.get("id") == want:
                assert "error" not in msg, (method, msg["error"])
                return msg["result"]
            if "method" in msg:
                self._event(msg)

    def _event(self, msg):
        if msg["method"] == "Fetch.requestPaused":
            p = msg["params"]
            url = p["request"]["url"]
            headers = [{"name": k, "value": v} for k, v in p["request"]["headers"].items()]
            headers += [{"name": "X-aws-proxy-auth", "value": t} for prefix, t in self.tokens if url.startswith(prefix)][:1]
            self.send("Fetch.continueRequest", {"requestId": p["requestId"], "headers": headers}, msg.get("sessionId"))
        else:
            self.events.append(msg)

    def page(self):
        """A new tab, attached (flat session), its network observed and the tokens added."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Network.enable", session=s)
        self.call("Page.enable", session=s)
        self.call("Fetch.enable", {"patterns": [{"urlPattern": prefix + "*", "requestStage": "Request"} for prefix, _ in self.tokens]},
                  session=s)
        return s

    def load(self, s, url):
        """Loads `url` and returns the findings the page wrote into its DOM."""
        self.events.clear()
        nav = self.call("Page.navigate", {"url": url}, session=s)
        assert not nav.get("errorText"), f"{url}: {nav}"
        return self._findings(s, url)

    def _findings(self, s, url):
        poll = """new Promise(done => { const t = () => { const e = document.getElementById("findings");
                  e && e.dataset.done ? done(e.textContent) : setTimeout(t, 100); }; t(); })"""
        deadline = time.monotonic() + 120
        while True:
            r = self.call("Runtime.evaluate", {"expression": poll, "awaitPromise": True, "returnByValue": True}, session=s)
            if "exceptionDetails" not in r:
                return json.loads(r["result"]["value"])
            # Still the old page, or its context went with the navigation: ask again.
            assert time.monotonic() < deadline, f"{url}: no findings: {r}"
            time.sleep(0.2)

    def network(self, tag):
        """What DevTools saw of the request tagged with fragment `tag`: its failure,
        the `Sec-Fetch-Site` it was sent with, and its cookies, sent or withheld (and why)."""
        ids = {e["params"]["requestId"] for e in self.events
               if e["method"] == "Network.requestWillBeSent" and e["params"]["request"].get("urlFragment") == "#" + tag}
        assert len(ids) == 1, f"request #{tag}: {ids}"
        out = {"cookies": {}}
        for e in self.events:
            p = e["params"]
            if p.get("requestId") not in ids:
                continue
            if e["method"] == "Network.loadingFailed":
                out["failed"] = p.get("corsErrorStatus", {}).get("corsError") or p.get("blockedReason") or p["errorText"]
            elif e["method"] == "Network.requestWillBeSentExtraInfo":
                out["site"] = {k.lower(): v for k, v in p["headers"].items()}.get("sec-fetch-site")
                for c in p.get("associatedCookies", []):
                    out["cookies"][c["cookie"]["name"]] = c["blockedReasons"] or "sent"
        return out


def main():
    t0 = time.monotonic()
    a = client(KEY_A)
    a.create_microvm_image(name="page", baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + CTX},
                           hooks={"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 120}})
    v = wait_version(a, "page", "1")
    assert v["state"] == "SUCCESSFUL", v
    t1 = time.monotonic()
    one, two = (a.run_microvm(imageIdentifier="page")["microvmId"] for _ in range(2))
    t2 = time.monotonic()
    ends = {m: a.get_microvm(microvmIdentifier=m)["endpoint"] for m in (one, two)}
    tokens = {m: a.create_microvm_auth_token(microvmIdentifier=m, expirationInMinutes=10,
                                             allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"] for m in (one, two)}
    api = URL.rstrip("/")
    api_tls = "https://127.0.0.1:" + ends[one].rsplit(":", 1)[1]
    cross = in_chromium(api, api_tls, "https://" + ends[one], "https://" + ends[two], f"{api}/microvms/{one}/", tokens[one], tokens[two])
    print("cross-microvm:", json.dumps(cross), flush=True)
    print(f"build {t1 - t0:.1f} s, two runs {t2 - t1:.1f} s, browser {time.monotonic() - t2:.1f} s", flush=True)
    print("browser origin rule: ok", flush=True)


def in_chromium(api, api_tls, page, other, path_page, token, other_token):
    """The page at `page` (an endpoint), then at `path_page` (the same microvm's path
    form), against the API at `api` and `api_tls` and the endpoint `other`. Returns what
    Chromium did across the two endpoints."""
    ports = sorted({urllib.parse.urlsplit(u).port for u in (api, api_tls, page, other)})
    browser = Chromium([(page + "/", token), (other + "/", other_token), (path_page, token)], ports)
    try:
        s = browser.page()
        # A cookie of the API's host, as a web UI of the API's (none exists) would set one:
        # no SameSite attribute, so the browser's default (Lax), readable by scripts.
        browser.call("Network.setCookie", {"name": "api_session", "value": "s3cret", "url": api + "/"}, session=s)
        # The other microvm's cookies, one of each SameSite kind, set as its app would.
        for kind in ("Strict", "Lax", "None"):
            browser.call("Network.setCookie", {"name": "two_" + kind.lower(), "value": "1", "url": other + "/", "secure": True,
                                                "sameSite": kind}, session=s)
        frag = urllib.parse.quote(json.dumps({"api": api, "api_tls": api_tls, "other": other}))
        f = browser.load(s, f"{page}/#{frag}")
        print("endpoint page:", json.dumps(f), flush=True)
        seen = {t: browser.network(t) for t in ("own", "fetch", "tls", "opaque", "xhr", "other", "other-xhr")}
        print("endpoint page, network:", json.dumps(seen), flush=True)

        # The control: the page's own origin is read, its cookies are sent and readable.
        assert f["origin"] == page, f
        assert f["own"] == {"read": True, "type": "basic", "status": 200, "body": "own=1"}, f["own"]
        assert "app=1" in f["cookies"].split("; "), f
        # The API: requests go out (the API answers them: a CORS failure needs an answer)
        # and no answer is readable, over either listener, by fetch or XHR.
        assert not f["api"]["read"] and "Failed to fetch" in f["api"]["error"], f
        assert not f["api_tls"]["read"] and "Failed to fetch" in f["api_tls"]["error"], f
        assert seen["fetch"]["failed"] == seen["tls"]["failed"] == "MissingAllowOriginHeader", seen
        assert seen["xhr"]["failed"] == "MissingAllowOriginHeader", seen
        assert f["api_opaque"] == {"read": True, "type": "opaque", "status": 0, "body": ""}, f
        assert f["api_xhr"] == {"read": False, "status": 0, "body": ""}, f
        # ... from another site: the API's cookie is neither readable nor sent.
        assert "api_session" not in f["cookies"], f
        assert seen["fetch"]["site"] == "cross-site", seen
        assert seen["fetch"]["cookies"].get("api_session") != "sent", seen
        # Another microvm's endpoint: another origin, its answers unreadable.
        assert not f["other"]["read"] and f["other_xhr"] == {"read": False, "status": 0, "body": ""}, f
        assert seen["other"]["failed"] == "MissingAllowOriginHeader", seen
        # ... and, to Chromium, another site (`localhost` is no registry it knows, so each
        # `<id>.localhost` is a site of its own): the other microvm's Strict and Lax
        # cookies are withheld, and a cookie for all of `localhost` is refused. Recorded
        # in docs/SECURITY.md ("One origin rule"): change it there if this changes.
        cross = {"site": seen["other"]["site"], "cookies": seen["other"]["cookies"],
                 "wide_cookie_kept": "wide=1" in f["cookies"].split("; ")}
        assert cross["site"] == "cross-site" and not cross["wide_cookie_kept"], cross
        assert "SchemefulSameSiteStrict" in cross["cookies"]["two_strict"] and "SchemefulSameSiteLax" in cross["cookies"]["two_lax"], cross

        # The path form: the daemon's origin. The browser sends that origin's cookies
        # and the app gets none; the app's Set-Cookie never reaches the browser.
        frag = urllib.parse.quote(json.dumps({"api": "", "api_tls": api_tls}))
        f = browser.load(s, f"{path_page}index.html#{frag}")
        print("path form page:", json.dumps(f), flush=True)
        own = browser.network("own")
        print("path form page, network:", json.dumps(own), flush=True)
        assert f["origin"] == api, f
        assert own["cookies"] == {"api_session": "sent", "own": "sent"}, own
        assert f["own"] == {"read": True, "type": "basic", "status": 200, "body": ""}, f["own"]
        assert "app=1" not in f["cookies"], f
        # Documented (docs/SECURITY.md): the page's script shares the daemon's origin, so
        # it reads the API's answers (unsigned: 403) and the cookies of that origin.
        assert f["api"]["read"] and f["api"]["status"] == 403, f
        assert "api_session=s3cret" in f["cookies"], f
    finally:
        browser.close()
    return cross


if __name__ == "__main__":
    main()
