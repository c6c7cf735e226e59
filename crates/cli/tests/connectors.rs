//! Domain allow lists (named egress connectors' domains) against real VMs: a test host in
//! a network namespace of its own (as in `network.rs`) serves DNS, HTTP on 80 and a TLS
//! stand-in on 443. The guest resolves only listed names (through the domain guard at
//! 10.0.2.3), reaches their addresses on 80/443 only when its TLS SNI or HTTP Host is
//! listed too, never gets an answer pointing into a private range (DNS rebinding), and a
//! policy change or a suspend/resume keeps all of that. Then the same through the API
//! (`tests/api/test_connectors.py`): connectors as a resource, named by RunMicrovm, edited
//! under running and suspended microvms, the operator's from `hearth connectors`.

mod common;
mod daemon;

use hearth_proto::exec::ExecRequest;
use hearth_vmm::net::Egress;
use hearth_vmm::Vm;
use std::process::{Child, Command, Stdio};

const PEER_IP: &str = "198.51.100.1";
const PEER_GW: &str = "198.51.100.254";
/// The test host's private address: what the rebinding name resolves to.
const PRIVATE_IP: &str = "10.251.8.1";

/// The test host: DNS (names starting `rebind.` answer its private address, any other its
/// public one, TTL 60), HTTP on 80 answering `http-ok <Host>`, and on 443 a server that
/// takes a ClientHello and answers `tls-peer`.
const SERVERS: &str = "
import socket, threading, http.server, time
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d.bind(('198.51.100.1', 53))
def dns():
    while True:
        q, a = d.recvfrom(512)
        i = 12
        labels = []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode()); i += q[i] + 1
        ip = '10.251.8.1' if labels and labels[0] == 'rebind' else '198.51.100.1'
        ans = b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04' + socket.inet_aton(ip) if q[i + 1:i + 3] == b'\\x00\\x01' else b''
        d.sendto(q[:2] + b'\\x81\\x80' + q[4:6] + (b'\\x00\\x01' if ans else b'\\x00\\x00') + b'\\x00\\x00\\x00\\x00' + q[12:i + 5] + ans, a)
threading.Thread(target=dns, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == '/slow':
            time.sleep(8)
        body = ('http-ok ' + self.headers.get('Host', '')).encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        pass
h = http.server.ThreadingHTTPServer(('', 80), H)
h.handle_error = lambda *a: None  # the client the guard cut
threading.Thread(target=h.serve_forever, daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(('', 443)); t.listen(16)
print('ready', flush=True)
while True:
    c, a = t.accept(); c.recv(4096); c.sendall(b'tls-peer'); c.close()
";

/// A test host in its own namespace; removed (with its servers) when dropped. One at a
/// time (its addresses are fixed).
struct Peer {
    ns: String,
    host_dev: String,
    server: Child,
    _one: std::sync::MutexGuard<'static, ()>,
}

static ONE_PEER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Peer {
    fn start() -> Peer {
        let one = ONE_PEER.lock().unwrap_or_else(|p| p.into_inner());
        let ns = format!("hearth-test-conn-{}", std::process::id());
        let host_dev = format!("htc{}", std::process::id() % 100_000);
        let sh = |c: &str| {
            let o = Command::new("sh").args(["-c", c]).output().unwrap();
            assert!(o.status.success(), "{c}: {}", String::from_utf8_lossy(&o.stderr));
        };
        sh(&format!("ip netns add {ns}"));
        let mut peer = Peer { ns: ns.clone(), host_dev: host_dev.clone(), server: Command::new("true").spawn().unwrap(), _one: one };
        sh(&format!(
            "ip link add {host_dev} type veth peer name eth0 netns {ns} && ip addr add {PEER_GW}/24 dev {host_dev} && ip link set {host_dev} up && \
             ip -n {ns} addr add {PEER_IP}/24 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && ip -n {ns} route add default via {PEER_GW} && \
             ip -n {ns} addr add {PRIVATE_IP}/24 dev eth0"
        ));
        peer.server = Command::new("ip").args(["netns", "exec", &ns, "python3", "-c", SERVERS]).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(peer.server.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        peer
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // The link first: a namespace's devices go asynchronously, after `netns del`.
        let _ = Command::new("ip").args(["link", "del", &self.host_dev]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// `dns NAME`, `http ADDR HOST` (GET / on port 80 with that Host; `slow`: GET /slow, which
/// the test host answers after 8 s), `tls ADDR NAME` (a ClientHello with that SNI to port
/// 443, then the first bytes back). Sockets time out after 4 s.
const PROBE: &str = r#"
import socket, ssl, sys
kind, addr = sys.argv[1], sys.argv[2]
name = sys.argv[3] if len(sys.argv) > 3 else ''
try:
    if kind == 'dns':
        print(socket.gethostbyname(addr))
    elif kind in ('http', 'slow'):
        s = socket.create_connection((addr, 80), timeout=4)
        s.sendall(('GET ' + ('/slow' if kind == 'slow' else '/') + ' HTTP/1.1\r\nHost: ' + name + '\r\nConnection: close\r\n\r\n').encode())
        data = b''
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        print(data.split(b'\r\n\r\n', 1)[-1].decode() if data else 'closed')
    else:
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname=name)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        s = socket.create_connection((addr, 443), timeout=4)
        s.sendall(out.read())
        print(s.recv(100).decode() or 'closed')
except Exception as e:
    print('fail:' + type(e).__name__)
"#;

async fn probe(vm: &Vm, args: &[&str]) -> String {
    let mut argv = vec!["python3", "-c", PROBE];
    argv.extend_from_slice(args);
    let out = vm.exec(&ExecRequest::argv(argv), None, 1 << 16).await.unwrap();
    out.stdout_str().trim().to_owned()
}

fn guarded(domains: &[&str]) -> Egress {
    Egress { domains: domains.iter().map(|d| d.to_string()).collect(), ..Egress::none() }
}

/// Checks what the guest reaches under a policy listing `allowed.test` and
/// `*.allowed.test`.
async fn assert_guarded(vm: &Vm, when: &str) {
    // An address nobody resolved is closed, even on 80/443.
    assert!(probe(vm, &["http", PEER_IP, "allowed.test"]).await.starts_with("fail"), "{when}: an unresolved address was reachable");
    // A name off the list gets no answer.
    assert_eq!(probe(vm, &["dns", "evil.test"]).await, "fail:gaierror", "{when}: a name off the list resolved");
    // A listed name resolves, and its address is reachable with its name.
    assert_eq!(probe(vm, &["dns", "allowed.test"]).await, PEER_IP, "{when}: a listed name did not resolve");
    assert_eq!(probe(vm, &["http", "allowed.test", "allowed.test"]).await, "http-ok allowed.test", "{when}: HTTP to a listed name");
    assert_eq!(probe(vm, &["tls", "allowed.test", "api.allowed.test"]).await, "tls-peer", "{when}: TLS to a listed name");
    // The same address, another name: cut (SNI and Host are checked, not only addresses).
    assert_eq!(probe(vm, &["tls", PEER_IP, "evil.test"]).await, "closed", "{when}: a TLS SNI off the list got through");
    assert_eq!(probe(vm, &["http", PEER_IP, "evil.test"]).await, "closed", "{when}: an HTTP Host off the list got through");
    // By address, with a listed Host: reached.
    assert!(probe(vm, &["http", PEER_IP, "allowed.test"]).await.starts_with("http-ok"), "{when}: by address, listed Host");
    // DNS rebinding: a listed name answering a private address gets no address.
    assert_eq!(probe(vm, &["dns", "rebind.allowed.test"]).await, "fail:gaierror", "{when}: an answer into a private range got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_lists_hold_on_dns_sni_and_host_across_changes_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let _peer = Peer::start();
    std::env::set_var(hearth_vmm::net::DNS_ENV, PEER_IP);
    let mut cfg = common::config(hearth_image::base::Base::DebianBookworm);
    cfg.network = Some(guarded(&["allowed.test", "*.allowed.test"]));
    let vm = Vm::boot(cfg).await.unwrap();
    assert_guarded(&vm, "at boot").await;

    // A change applies to the running VM at once: a relayed connection to a name taken off
    // the list is cut (the guest sees it closed long before the answer or its timeout)...
    let (slow, ()) = tokio::join!(probe(&vm, &["slow", "allowed.test", "allowed.test"]), async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        vm.set_egress(&guarded(&["other.test"])).unwrap();
    });
    assert_eq!(slow, "closed", "an open connection to a name taken off the list went on");
    // ...the old name no longer resolves, and the addresses it taught are forgotten.
    assert_eq!(probe(&vm, &["dns", "allowed.test"]).await, "fail:gaierror", "a name taken off the list still resolved");
    assert!(probe(&vm, &["http", PEER_IP, "allowed.test"]).await.starts_with("fail"), "a forgotten address was reachable");
    assert_eq!(probe(&vm, &["dns", "other.test"]).await, PEER_IP);
    assert_eq!(probe(&vm, &["http", PEER_IP, "other.test"]).await, "http-ok other.test");
    // Internet egress without domains: names resolve through the host's resolver again.
    vm.set_egress(&Egress::internet()).unwrap();
    assert_eq!(probe(&vm, &["dns", "evil.test"]).await, PEER_IP, "the guard outlived its domains");

    // Suspend and resume: the policy (and its guard) comes back with the VM.
    vm.set_egress(&guarded(&["allowed.test", "*.allowed.test"])).unwrap();
    let snap = vm.suspend(&tmp.path().join("suspended")).await.map_err(|(_, e)| e).unwrap();
    let vm = Vm::resume(&snap, &hearth_vmm::RestoreOptions::new()).await.unwrap();
    assert_eq!(vm.egress(), Some(guarded(&["allowed.test", "*.allowed.test"])));
    assert_guarded(&vm, "after resume").await;
    vm.kill().await;
}

#[test]
fn connectors_through_the_api_follow_changes_and_resume() {
    let peer = Peer::start();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (daemon::key(&state), daemon::key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("web")).unwrap();
    std::fs::write(ctx.join("web/Dockerfile"), "FROM debian:bookworm\nRUN echo ok > /ok\n").unwrap();
    daemon::allow_artifacts(&state, &a, &ctx);
    let _microvms = daemon::Microvms(state.clone());
    // Guests' DNS goes to the test host (through each microvm's domain guard).
    let log = tmp.path().join("daemon.log");
    let start = || daemon::Daemon::start_with(&state, &[(hearth_vmm::net::DNS_ENV, PEER_IP)], &log);
    let bin = [("HEARTH_BIN", env!("CARGO_BIN_EXE_hearth").to_owned())];
    let script = |d: &daemon::Daemon, args: &[&str]| {
        std::panic::catch_unwind(|| daemon::run_script("test_connectors.py", &d.1, (&a, &b), &ctx, &state, args, &bin)).unwrap_or_else(
            |e| {
                eprintln!("daemon log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                std::panic::resume_unwind(e)
            },
        )
    };
    let mut d = start();
    let out = script(&d, &[]);
    assert!(out.contains("connectors: ok"), "{out}");
    let ids: serde_json::Value = serde_json::from_str(out.lines().rev().nth(1).unwrap()).unwrap();
    // Killed: the microvm's QEMU runs on, its domain guard (the daemon's) is gone.
    d.kill9();
    let d = start();
    let out = script(&d, &["restart", ids["running"].as_str().unwrap()]);
    assert!(out.contains("restart: ok"), "{out}");
    drop(d);
    drop(peer);
}
