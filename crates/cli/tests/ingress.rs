//! Traffic into microvms through `hearth serve` (`tests/api/test_ingress.py`): the
//! endpoint over HTTP/1.1 and HTTP/2, streaming bodies, SSE, WebSocket, 1,000 concurrent
//! connections, an app that never answers; the endpoint by host name over TLS and the
//! service's shell protocol, driven by `requests` and `websockets` code written as the
//! service's users write it; the origin rule; shells over a WebSocket and `hearth shell`.
//! A test binary of its own, so it never runs beside the timing-sensitive API test.

mod daemon;

use daemon::*;
use std::process::Stdio;

/// The app behind the endpoint test: plain answers, a hash of the request body, a large
/// response, server-sent events, a WebSocket echo, a slow handler that counts how many
/// requests it holds at once, its process list, and a port that accepts and never answers.
const NET_APP: &str = r#"
import base64, hashlib, http.server, json, os, socket, socketserver, struct, threading, time
lock = threading.Lock()
state = {"now": 0, "peak": 0}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def send(self, body, ctype="text/plain"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/ready":
            return self.send(b"ok\n")
        if self.path == "/host":
            return self.send((self.headers.get("Host") or "").encode())
        if self.path == "/link":
            # An absolute link, as apps build them from the request.
            proto = self.headers.get("X-Forwarded-Proto") or "http"
            return self.send(("%s://%s/next" % (proto, self.headers.get("Host"))).encode())
        if self.path == "/cookie":
            body = (self.headers.get("Cookie") or "").encode()
            self.send_response(200)
            self.send_header("Set-Cookie", "app=1; Path=/")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/wsp":
            return self.websocket(hello=self.headers.get("Sec-WebSocket-Protocol") or "")
        if self.path == "/big":
            return self.send(b"x" * (8 << 20))
        if self.path == "/stats":
            return self.send(json.dumps(state).encode())
        if self.path == "/procs":
            out = []
            for p in os.listdir("/proc"):
                try:
                    out.append(open("/proc/%s/cmdline" % p, "rb").read().replace(b"\0", b" "))
                except Exception:
                    pass
            return self.send(b"\n".join(out))
        if self.path == "/hold":
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(3)
            with lock:
                state["now"] -= 1
            return self.send(b"held\n")
        if self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(3):
                self.wfile.write(b"data: tick %d\n\n" % i)
                self.wfile.flush()
                time.sleep(1)
            self.close_connection = True
            return
        if self.path == "/ws":
            return self.websocket()
        self.send_error(404)
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        h, left = hashlib.sha256(), n
        while left:
            d = self.rfile.read(min(left, 65536))
            if not d:
                break
            h.update(d)
            left -= len(d)
        self.send(("%d %s" % (n, h.hexdigest())).encode())
    def websocket(self, hello=None):
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
        self.end_headers()
        if hello is not None:
            # The subprotocols the app was offered, as a first text message.
            out = ("protocols:" + hello).encode()
            self.wfile.write(bytes([0x81, len(out)]) + out)
        self.wfile.flush()
        while True:
            hdr = self.rfile.read(2)
            if len(hdr) < 2:
                return
            op, n = hdr[0] & 15, hdr[1] & 127
            if n == 126:
                n = struct.unpack(">H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if hdr[1] & 128 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if op == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                self.close_connection = True
                return
            if op in (1, 2):
                out = b"echo:" + data
                head = bytes([0x80 | op]) + (bytes([len(out)]) if len(out) < 126 else b"\x7e" + struct.pack(">H", len(out)) if len(out) < 65536 else b"\x7f" + struct.pack(">Q", len(out)))
                self.wfile.write(head + out)
                self.wfile.flush()
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 512
def silent():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 8081))
    s.listen(64)
    held = []
    while True:
        held.append(s.accept()[0])
threading.Thread(target=silent, daemon=True).start()
S(("127.0.0.1", 8080), H).serve_forever()
"#;

#[test]
fn the_endpoint_carries_http2_sse_websockets_and_floods_and_shells_get_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("net")).unwrap();
    std::fs::write(ctx.join("net/Dockerfile"), "FROM debian:bookworm\nCOPY app.py /app/app.py\nCMD [\"python3\", \"/app/app.py\"]\n")
        .unwrap();
    std::fs::write(ctx.join("net/app.py"), NET_APP).unwrap();
    // The first tenant's operator lets it build from the test's directories; the second
    // may name no host path at all.
    allow_artifacts(&state, &a, &ctx);
    let _microvms = Microvms(state.clone());
    let daemon = Daemon::start(&state);
    let env = [("HEARTH_CTX_NET", ctx.join("net").display().to_string()), ("HEARTH_DAEMON_PID", daemon.0.id().to_string())];
    let out = run_script("test_ingress.py", &daemon.1, (&a, &b), &ctx, &state, &[], &env);
    let ids: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap_or_else(|_| panic!("{out}"));
    let mid = ids["shell"].as_str().unwrap();

    // `hearth shell` with piped input: no terminal, the input's end ends the shell; the
    // exit code passes through; --tty asks for a terminal anyway.
    let shell = |args: &[&str], input: &str| {
        let mut child = client(&daemon, &a)
            .arg("shell")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Written from a thread: the output is read meanwhile.
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_owned();
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        out
    };
    let o = shell(&[mid], "echo hi$((1+1)); tty\nexit 4\n");
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi2\nnot a tty\n");
    let o = shell(&[mid], "echo no exit here\n");
    assert_eq!(o.status.code(), Some(0), "the end of input ends the shell: {o:?}");
    // Input and output at once, both larger than every buffer on the way: they must not
    // wait on each other.
    let big: String = (0..200_000).map(|i| format!("line {i:08}\n")).collect();
    let o = shell(&[mid, "--", "cat"], &big);
    assert!(o.status.success(), "{:?}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == big.as_bytes(), "cat through the shell returned {} of {} bytes", o.stdout.len(), big.len());
    let o = shell(&["--tty", mid], "tty; exit\n");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("/dev/pts/"), "{o:?}");
    let o = shell(&[mid, "--", "echo one; exit 5"], "");
    assert!(o.status.code() == Some(5) && String::from_utf8_lossy(&o.stdout).contains("one"), "{o:?}");
    let o = shell(&["mvm-nope"], "");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ResourceNotFoundException"), "{o:?}");
    drop(daemon);
}
