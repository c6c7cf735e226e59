//! Microvm egress, against a test host in a network namespace this test creates (an
//! address outside the private ranges, on this machine only): TCP reaches it with internet
//! egress, a deny rule or `none` stops it at once without a restart, UDP is dropped, and
//! the host's own addresses and the VM's gateway are unreachable whatever the policy. The
//! test host has a private address too: reached with an allow rule only where the host's
//! ceiling (the operator) opens it. Tenants' code artifact downloads reach the test host
//! from a namespace of their own, and never its private address.

mod common;

use hearth_proto::exec::ExecRequest;
use hearth_vmm::net::{Egress, Rule};
use hearth_vmm::Vm;
use std::process::{Child, Command, Stdio};

const PEER_IP: &str = "198.51.100.1";
const PEER_GW: &str = "198.51.100.254";
const TCP_PORT: u16 = 8765;
const UDP_PORT: u16 = 8766;
const HTTP_PORT: u16 = 8767;
/// The test host's private address (and the host's end of its link there).
const PRIVATE_IP: &str = "10.251.7.1";
const PRIVATE_GW: &str = "10.251.7.254";

/// A test host in its own namespace; removed (with its server) when dropped.
struct Peer {
    ns: String,
    server: Child,
    udp_log: std::path::PathBuf,
}

impl Peer {
    fn start(dir: &std::path::Path) -> Peer {
        let ns = format!("hearth-test-peer-{}", std::process::id());
        let host_dev = format!("htp{}", std::process::id() % 100_000);
        let sh = |c: &str| {
            let o = Command::new("sh").args(["-c", c]).output().unwrap();
            assert!(o.status.success(), "{c}: {}", String::from_utf8_lossy(&o.stderr));
        };
        sh(&format!("ip netns add {ns}"));
        let udp_log = dir.join("udp.log");
        let mut peer = Peer { ns: ns.clone(), server: Command::new("true").spawn().unwrap(), udp_log: udp_log.clone() };
        sh(&format!(
            "ip link add {host_dev} type veth peer name eth0 netns {ns} && ip addr add {PEER_GW}/24 dev {host_dev} && ip link set {host_dev} up && \
             ip -n {ns} addr add {PEER_IP}/24 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && ip -n {ns} route add default via {PEER_GW} && \
             ip addr add {PRIVATE_GW}/24 dev {host_dev} && ip -n {ns} addr add {PRIVATE_IP}/24 dev eth0"
        ));
        let script = format!(
            "import socket, threading\n\
             t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(('', {TCP_PORT})); t.listen(16)\n\
             u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('{PEER_IP}', {UDP_PORT}))\n\
             def udp():\n    while True:\n        d, a = u.recvfrom(100)\n        open('{}', 'a').write('got\\n')\n\
             threading.Thread(target=udp, daemon=True).start()\n\
             {DNS_SERVER}\
             threading.Thread(target=dns, daemon=True).start()\n\
             {HTTP_SERVER}\
             threading.Thread(target=h.serve_forever, daemon=True).start()\n\
             print('ready', flush=True)\n\
             while True:\n    c, a = t.accept(); c.sendall(b'peer-ok'); c.close()\n",
            udp_log.display()
        );
        peer.server = Command::new("ip").args(["netns", "exec", &ns, "python3", "-c", &script]).stdout(Stdio::piped()).spawn().unwrap();
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
        // The veth pair goes with the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A DNS server for the test host: every A query is answered with the test host's
/// address, anything else with no records.
const DNS_SERVER: &str = "
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d.bind(('198.51.100.1', 53))
def dns():
    while True:
        q, a = d.recvfrom(512)
        i = 12
        while q[i]:
            i += q[i] + 1
        ans = b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04' + socket.inet_aton('198.51.100.1') if q[i + 1:i + 3] == b'\\x00\\x01' else b''
        d.sendto(q[:2] + b'\\x81\\x80' + q[4:6] + (b'\\x00\\x01' if ans else b'\\x00\\x00') + b'\\x00\\x00\\x00\\x00' + q[12:i + 5] + ans, a)
";

/// An HTTP server for the test host: `/to-private` redirects to its private address,
/// anything else answers `artifact-ok`.
const HTTP_SERVER: &str = "
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'' if self.path == '/to-private' else b'artifact-ok'
        self.send_response(302 if self.path == '/to-private' else 200)
        if self.path == '/to-private':
            self.send_header('Location', 'http://10.251.7.1:8767/app.zip')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
h = http.server.ThreadingHTTPServer(('', 8767), H)
";

const PROBE: &str = r#"
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == 'dns':
        print(socket.gethostbyname(host))
    elif kind == 'tcp':
        s = socket.create_connection((host, port), timeout=3)
        print(s.recv(100).decode() or 'connected')
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b'x', (host, port))
        print('sent')
except Exception as e:
    print('fail:' + type(e).__name__)
"#;

async fn probe(vm: &Vm, kind: &str, host: &str, port: u16) -> String {
    let r = ExecRequest::argv(["python3", "-c", PROBE, kind, host, &port.to_string()]);
    let out = vm.exec(&r, None, 1 << 16).await.unwrap();
    out.stdout_str().trim().to_owned()
}

/// The host's first global IPv4 address.
fn host_ip() -> String {
    let o = Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let word = text.split_whitespace().skip_while(|w| *w != "inet").nth(1).expect("a global IPv4 address");
    word.split('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_is_enforced_and_changes_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::start(tmp.path());
    // A service on the host itself, listening on every address.
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();

    // Guests' DNS goes to the test host's server (set before any VM of this test starts;
    // the other tests here do not resolve names).
    std::env::set_var(hearth_vmm::net::DNS_ENV, PEER_IP);

    // A tenant's code artifact download (from a namespace of its own, as root) reaches the
    // test host's public address, not its private one, directly or by a redirect, and
    // leaves no namespace behind.
    let work = tempfile::tempdir().unwrap();
    let fetch = |uri: String| {
        let work = work.path().to_owned();
        async move { hearth_image::artifact::fetch(&uri, &work, Default::default()).await }
    };
    let file = fetch(format!("http://{PEER_IP}:{HTTP_PORT}/app.zip")).await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"artifact-ok");
    std::fs::remove_file(file).unwrap();
    for path in [format!("http://{PRIVATE_IP}:{HTTP_PORT}/app.zip"), format!("http://{PEER_IP}:{HTTP_PORT}/to-private")] {
        let e = fetch(path.clone()).await.unwrap_err();
        assert!(matches!(e, hearth_image::artifact::ArtifactError::Refused { ref host, .. } if host == PRIVATE_IP), "{path}: {e}");
    }
    assert!(std::fs::read_dir(work.path()).unwrap().next().is_none(), "a download left a file behind");
    let fetch_namespaces = || {
        std::fs::read_dir("/run/netns").unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("hearth-fetch-")).count()
    };
    assert_eq!(fetch_namespaces(), 0, "a download's network namespace outlived it");
    let mut cfg = common::config(hearth_image::base::Base::DebianBookworm);
    cfg.network = Some(Egress::internet());
    let vm = Vm::boot(cfg).await.unwrap();
    assert!(vm.netns().is_some());

    assert_eq!(probe(&vm, "tcp", PEER_IP, TCP_PORT).await, "peer-ok", "internet egress cannot reach the test host");
    // DNS works although UDP is closed: names resolve, and connections by name go out.
    assert_eq!(probe(&vm, "dns", "peer.hearth.test", 0).await, PEER_IP, "DNS does not resolve");
    assert_eq!(probe(&vm, "tcp", "peer.hearth.test", TCP_PORT).await, "peer-ok");
    // Link-local metadata addresses (where clouds serve instance credentials) are closed.
    assert!(probe(&vm, "tcp", "169.254.169.254", 80).await.starts_with("fail"), "the guest reached a metadata address");
    // The host and the VM's own gateway are closed whatever the policy.
    assert!(probe(&vm, "tcp", &host_ip(), host_port).await.starts_with("fail"), "the guest reached a host service");
    // The host's address on the test host's link is public-range, so only the host's own
    // rules (not the private-range drop) keep the guest from its service there.
    assert_eq!(probe(&vm, "tcp", PEER_GW, host_port).await, "fail:TimeoutError", "the guest reached a host service on a public address");
    assert!(probe(&vm, "tcp", "10.0.2.2", host_port).await.starts_with("fail"), "the guest reached its namespace");
    // Outbound UDP (other than DNS) is dropped.
    assert_eq!(probe(&vm, "udp", PEER_IP, UDP_PORT).await, "sent");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!peer.udp_log.exists(), "a UDP datagram got out");

    // Policy changes apply at once, no restart.
    let deny = Egress { deny: vec![Rule::parse(&format!("{PEER_IP}:{TCP_PORT}/tcp")).unwrap()], ..Egress::internet() };
    vm.set_egress(&deny).unwrap();
    assert!(probe(&vm, "tcp", PEER_IP, TCP_PORT).await.starts_with("fail"), "the deny rule did not apply");
    vm.set_egress(&Egress::none()).unwrap();
    assert!(probe(&vm, "tcp", PEER_IP, TCP_PORT).await.starts_with("fail"), "egress none let TCP out");
    // An allow rule opens UDP to one destination.
    let udp_ok = Egress { allow: vec![Rule::parse(&format!("{PEER_IP}:{UDP_PORT}/udp")).unwrap()], ..Egress::none() };
    vm.set_egress(&udp_ok).unwrap();
    assert_eq!(probe(&vm, "udp", PEER_IP, UDP_PORT).await, "sent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !peer.udp_log.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(peer.udp_log.exists(), "the allowed UDP datagram did not arrive");
    vm.set_egress(&Egress::internet()).unwrap();
    assert_eq!(probe(&vm, "tcp", PEER_IP, TCP_PORT).await, "peer-ok");
    assert!(vm
        .set_egress(&Egress { allow: vec![Rule { cidr: "10.0.0.1/8".into(), proto: Default::default(), ports: None }], ..Egress::none() })
        .is_err());

    // Private addresses: closed to internet egress; opened by an allow rule where this
    // process is the operator's (no host ceiling: `hearth vm run --allow`)...
    assert!(probe(&vm, "tcp", PRIVATE_IP, TCP_PORT).await.starts_with("fail"), "internet egress reached a private address");
    let private = Egress { allow: vec![Rule::parse(&format!("{PRIVATE_IP}:{TCP_PORT}/tcp")).unwrap()], ..Egress::internet() };
    vm.set_egress(&private).unwrap();
    assert_eq!(probe(&vm, "tcp", PRIVATE_IP, TCP_PORT).await, "peer-ok", "the operator's allow rule did not open a private address");
    // ...a tenant's rule is refused under a host ceiling that does not open the range (as
    // the API refuses it), and a policy loaded regardless is cut by the namespace...
    hearth_vmm::net::set_host_ceiling(Some(hearth_vmm::net::Ceiling::default()));
    let refused = private.within(&hearth_vmm::net::host_ceiling().unwrap()).unwrap_err();
    assert!(refused.to_string().contains(hearth_vmm::net::CEILING_SETTING), "{refused}");
    vm.set_egress(&private).unwrap();
    assert!(probe(&vm, "tcp", PRIVATE_IP, TCP_PORT).await.starts_with("fail"), "a tenant's rule reached past the host ceiling");
    assert_eq!(probe(&vm, "tcp", PEER_IP, TCP_PORT).await, "peer-ok", "the ceiling closed a public address");
    // ...and allowed once the operator opens the range for the host.
    let ceiling = hearth_vmm::net::Ceiling { allow: vec![Rule::parse("10.251.7.0/24").unwrap()] };
    private.within(&ceiling).unwrap();
    hearth_vmm::net::set_host_ceiling(Some(ceiling));
    vm.set_egress(&private).unwrap();
    assert_eq!(probe(&vm, "tcp", PRIVATE_IP, TCP_PORT).await, "peer-ok", "the operator's ceiling did not open the range");
    // The ceiling opens nothing by itself: internet egress alone stays out.
    vm.set_egress(&Egress::internet()).unwrap();
    assert!(probe(&vm, "tcp", PRIVATE_IP, TCP_PORT).await.starts_with("fail"), "the ceiling alone opened a private address");
    hearth_vmm::net::set_host_ceiling(None);

    // Suspend and resume: a new namespace, the same guest addresses, the policy kept.
    let first_ns = vm.netns().unwrap().to_owned();
    let snap = vm.suspend(&tmp.path().join("suspended")).await.map_err(|(_, e)| e).unwrap();
    assert!(!std::path::Path::new("/run/netns").join(&first_ns).exists(), "a suspended VM kept its namespace");
    let vm = Vm::resume(&snap, &hearth_vmm::RestoreOptions::new()).await.unwrap();
    assert_ne!(vm.netns().unwrap(), first_ns);
    assert_eq!(vm.egress(), Some(Egress::internet()));
    assert_eq!(probe(&vm, "tcp", PEER_IP, TCP_PORT).await, "peer-ok", "egress lost across suspend/resume");

    // Template clones: each its own namespace; egress closed unless the launcher opens it.
    vm.kill().await;
    let mut cfg = common::config(hearth_image::base::Base::DebianBookworm);
    cfg.network = Some(Egress::internet());
    cfg.memory = hearth_vmm::Memory::SnapshotReady;
    let tpl = Vm::boot(cfg).await.unwrap().snapshot_template(&tmp.path().join("template")).await.unwrap();
    let open = hearth_vmm::RestoreOptions { egress: Some(Egress::internet()), ..hearth_vmm::RestoreOptions::new() };
    let a = Vm::launch(&tpl, &open).await.unwrap();
    let b = Vm::launch(&tpl, &open).await.unwrap();
    let closed = Vm::launch(&tpl, &hearth_vmm::RestoreOptions::new()).await.unwrap();
    assert_ne!(a.netns(), b.netns());
    assert_eq!(probe(&a, "tcp", PEER_IP, TCP_PORT).await, "peer-ok");
    assert_eq!(probe(&b, "tcp", PEER_IP, TCP_PORT).await, "peer-ok");
    assert!(probe(&closed, "tcp", PEER_IP, TCP_PORT).await.starts_with("fail"), "a clone got egress nobody gave it");
    // Another microvm is unreachable, even with private ranges allowed in the policy: a
    // listener in b's namespace (where b's traffic leaves from) is out of a's reach
    // (forwarding between uplinks is dropped on the host, namespaces take no input).
    let b_uplink = {
        let o = Command::new("ip").args(["-n", b.netns().unwrap(), "-4", "-o", "addr", "show", "dev", "uplink"]).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap().split('/').next().unwrap().to_owned()
    };
    let mut listener = Command::new("ip")
        .args(["netns", "exec", b.netns().unwrap(), "python3", "-c"])
        .arg("import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8765)); s.listen(); print('ready', flush=True); c=s.accept(); c[0].sendall(b'reached'); time.sleep(5)")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(listener.stdout.as_mut().unwrap()), &mut line).unwrap();
    a.set_egress(&Egress { allow: vec![Rule::parse("10.200.0.0/16").unwrap()], ..Egress::internet() }).unwrap();
    let reached = probe(&a, "tcp", &b_uplink, 8765).await;
    let _ = listener.kill();
    let _ = listener.wait();
    assert!(reached.starts_with("fail"), "a microvm reached another's namespace: {reached}");
    let names: Vec<String> = [&a, &b, &closed].iter().map(|v| v.netns().unwrap().to_owned()).collect();
    for v in [a, b, closed] {
        v.kill().await;
    }
    for ns in names {
        assert!(!std::path::Path::new("/run/netns").join(&ns).exists(), "a clone's namespace outlived it");
    }
    drop(host_listener);
}
