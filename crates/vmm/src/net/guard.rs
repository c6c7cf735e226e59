//! The domain guard of a VM whose policy has domains ([`Egress::domains`]): a DNS server
//! at `10.0.2.3` and a transparent proxy, both inside the VM's namespace, run as tasks of
//! the process that holds the VM.
//!
//! ```text
//!  guest ── DNS 10.0.2.3:53 ──► guard: name on the list? ── no ──► NXDOMAIN
//!                                    │ yes: ask the resolver; A-records into closed ranges
//!                                    │ removed (rebinding); the rest added to the set
//!                                    ▼ `guarded` for the answer's TTL (30 s..1 h), then answered
//!  guest ── TCP to @guarded :80/:443 ──(redirect)──► proxy :15443: ClientHello SNI or HTTP
//!           Host on the list? ── no ──► connection closed
//!                 │ yes: connect from the namespace to the original destination (deny
//!                 ▼ rules, the ceiling and the set checked again on the way out), relay
//! ```
//!
//! Addresses reached through a CIDR rule are not proxied (their rules come first); the
//! rest of `@guarded` (other ports, UDP) is dropped. A relayed connection whose name leaves
//! the list is cut when the policy changes. Limits: the check reads the first request only
//! (later HTTP/1 requests on a kept-alive connection, and names inside TLS such as an
//! HTTP/2 `:authority` or an Encrypted ClientHello's inner name, are not seen — with ECH
//! the outer, public name is what must be on the list); a protocol other than TLS or HTTP/1
//! on ports 80/443 has no name and is cut; the guest's DNS over TCP is not served.

use super::dns::{self, MAX_DNS_MESSAGE};
use super::domains::domain_allowed;
use super::sni::{self, Sniff};
use super::{closed_range, span, Ceiling, Egress, NetError, Proto, Rule, DNS_IP};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch, Semaphore};

/// The proxy's port in the namespace (guarded connections are redirected to it).
pub const PROXY_PORT: u16 = 15443;
/// Relayed connections at once, per VM; more are refused.
const MAX_CONNECTIONS: usize = 256;
/// DNS queries in flight at once, per VM; more are dropped (the guest retries).
const MAX_QUERIES: usize = 64;
/// How long a connection has to name its host.
const PEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the upstream connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the resolver may take.
const RESOLVER_TIMEOUT: Duration = Duration::from_secs(3);
/// Most addresses learnt from answers at once, per VM (a guest resolving ever new names
/// under a wildcard cannot grow the set further; answers past it are not delivered).
const MAX_LEARNT: usize = 4096;
/// The ports whose connections are checked (and the only ones domains open).
const WEB_PORTS: [u16; 2] = [80, 443];

/// What the guard enforces.
#[derive(Debug, Clone)]
pub(super) struct Policy {
    /// The domain allow list.
    pub domains: Arc<Vec<String>>,
    /// What closed ranges answers may point into (rebinding).
    pub ceiling: Ceiling,
}

/// A socket made in the namespace by its thread.
enum Request {
    Tcp(oneshot::Sender<io::Result<TcpSocket>>),
    Udp(oneshot::Sender<io::Result<std::net::UdpSocket>>),
}

struct Shared {
    ns: PathBuf,
    resolver: Option<Ipv4Addr>,
    policy: watch::Receiver<Policy>,
    factory: std::sync::mpsc::Sender<Request>,
    connections: Arc<Semaphore>,
    queries: Arc<Semaphore>,
}

/// A running guard; its tasks end when it is dropped.
pub(super) struct Guard {
    policy: watch::Sender<Policy>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("domains", &self.policy.borrow().domains).finish()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The listeners go; relays see the policy's sender gone and end.
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn enter(ns: &Path) -> io::Result<()> {
    let f = std::fs::File::open(ns)?;
    // SAFETY: setns(2) on a descriptor `f` keeps open for the call; it changes this thread's
    // network namespace only (a thread of the guard's own), on which no memory safety depends.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Guard {
    /// Starts the guard in namespace `ns` (which has `tap0` with [`DNS_IP`]): a thread that
    /// lives in the namespace makes its sockets; tasks on the current tokio runtime serve.
    pub(super) fn start(ns: &Path, policy: Policy, resolver: Option<Ipv4Addr>) -> Result<Guard, NetError> {
        let fail = |detail: String| NetError::Tool { what: "start the domain guard".into(), detail };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| fail("it needs an async runtime".into()))?;
        let (factory, requests) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = ns.to_owned();
        std::thread::Builder::new()
            .name("hearth-netguard".into())
            .spawn(move || {
                let opened = (|| -> io::Result<_> {
                    enter(&path)?;
                    let udp = std::net::UdpSocket::bind((DNS_IP, 53))?;
                    udp.set_nonblocking(true)?;
                    let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PROXY_PORT))?;
                    tcp.set_nonblocking(true)?;
                    Ok((udp, tcp))
                })();
                let ok = opened.is_ok();
                let _ = ready_tx.send(opened);
                if !ok {
                    return;
                }
                // Serves until every sender (the guard's tasks) is gone.
                while let Ok(req) = requests.recv() {
                    match req {
                        Request::Tcp(r) => {
                            let _ = r.send(TcpSocket::new_v4());
                        }
                        Request::Udp(r) => {
                            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| s.set_nonblocking(true).map(|()| s));
                            let _ = r.send(s);
                        }
                    }
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        let (udp, tcp) = ready_rx.recv().map_err(|e| fail(e.to_string()))?.map_err(|e| fail(e.to_string()))?;
        let _entered = runtime.enter();
        let udp = Arc::new(UdpSocket::from_std(udp).map_err(|e| fail(e.to_string()))?);
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| fail(e.to_string()))?;
        let (tx, rx) = watch::channel(policy);
        let shared = Arc::new(Shared {
            ns: ns.to_owned(),
            resolver,
            policy: rx,
            factory,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            queries: Arc::new(Semaphore::new(MAX_QUERIES)),
        });
        let dns_task = runtime.spawn(dns_loop(udp, shared.clone())).abort_handle();
        let proxy_task = runtime.spawn(proxy_loop(tcp, shared)).abort_handle();
        Ok(Guard { policy: tx, tasks: vec![dns_task, proxy_task] })
    }

    /// Replaces the policy; true when the domains changed.
    pub(super) fn set(&self, policy: Policy) -> bool {
        let changed = *self.policy.borrow().domains != *policy.domains;
        self.policy.send_replace(policy);
        changed
    }
}

/// True when an address from an answer may be reached on the web ports: outside the
/// closed ranges, or inside one the ceiling opens for TCP 80 and 443.
fn reachable(ceiling: &Ceiling, a: Ipv4Addr) -> bool {
    if closed_range(a).is_none() {
        return true;
    }
    let cidr = format!("{a}/32");
    WEB_PORTS.iter().all(|&p| {
        let want = Rule { cidr: cidr.clone(), proto: Proto::Tcp, ports: Some((p, p)) };
        ceiling.allow.iter().any(|o| o.carries(&want) && span(&o.cidr).is_some_and(|(lo, hi)| lo <= u32::from(a) && u32::from(a) <= hi))
    })
}

impl Shared {
    async fn udp_socket(&self) -> io::Result<UdpSocket> {
        let (tx, rx) = oneshot::channel();
        self.factory.send(Request::Udp(tx)).map_err(|_| io::Error::other("the guard's thread is gone"))?;
        UdpSocket::from_std(rx.await.map_err(|_| io::Error::other("the guard's thread is gone"))??)
    }

    async fn tcp_socket(&self) -> io::Result<TcpSocket> {
        let (tx, rx) = oneshot::channel();
        self.factory.send(Request::Tcp(tx)).map_err(|_| io::Error::other("the guard's thread is gone"))?;
        rx.await.map_err(|_| io::Error::other("the guard's thread is gone"))?
    }

    /// The guest's answer to query `q`, if any.
    async fn answer(&self, q: &[u8]) -> Option<Vec<u8>> {
        let policy = self.policy.borrow().clone();
        let name = match dns::judge_query(q, &policy.domains) {
            dns::Query::Drop => return None,
            dns::Query::Answer(a) => return Some(a),
            dns::Query::Forward(name) => name,
        };
        let resolver = self.resolver?;
        let id = u16::from_be_bytes([q[0], q[1]]);
        let s = self.udp_socket().await.ok()?;
        s.send_to(q, (resolver, 53)).await.ok()?;
        let mut buf = vec![0u8; MAX_DNS_MESSAGE];
        let deadline = tokio::time::Instant::now() + RESOLVER_TIMEOUT;
        loop {
            let (n, from) = tokio::time::timeout_at(deadline, s.recv_from(&mut buf)).await.ok()?.ok()?;
            if from != SocketAddr::from((resolver, 53)) {
                continue;
            }
            let Some((out, learnt)) = dns::filter_answer(&buf[..n], id, |a| reachable(&policy.ceiling, a)) else { continue };
            tracing::debug!(%name, ?learnt, "DNS guard: answered");
            if !learnt.is_empty() {
                // Before the guest has the answer, so the connection that follows finds
                // the address open. Re-added, so a new TTL replaces an older one.
                let script: String = learnt
                    .iter()
                    .map(|(a, ttl)| {
                        format!(
                            "add element inet vm guarded {{ {a} }}\ndelete element inet vm guarded {{ {a} }}\nadd element inet vm guarded {{ {a} timeout {ttl}s }}\n"
                        )
                    })
                    .collect();
                let ns = self.ns.clone();
                let added = tokio::task::spawn_blocking(move || {
                    super::tool_in_ns("nft (learnt addresses)", &ns, Command::new("nft").args(["-f", "-"]), Some(&script))
                })
                .await;
                if !matches!(added, Ok(Ok(()))) {
                    tracing::warn!(?added, "DNS guard: could not open the answer's addresses");
                    return None;
                }
            }
            return Some(out);
        }
    }

    /// Relays one redirected connection if it names an allowed host.
    async fn relay(&self, mut guest: TcpStream) -> Result<(), String> {
        let dst = original_dst(&guest).map_err(|e| format!("no original destination: {e}"))?;
        if !WEB_PORTS.contains(&dst.port()) || dst.ip().octets()[..3] == [10, 0, 2] {
            return Err(format!("{dst} is not a guarded destination"));
        }
        let mut head = Vec::with_capacity(2048);
        let name = tokio::time::timeout(PEEK_TIMEOUT, async {
            let mut chunk = [0u8; 4096];
            loop {
                let n = guest.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed before naming its host".to_owned());
                }
                head.extend_from_slice(&chunk[..n]);
                match sni::sniff(&head) {
                    Sniff::Name(n) => return Ok(n),
                    Sniff::More => {}
                    Sniff::Nameless(why) => return Err(why.to_owned()),
                }
            }
        })
        .await
        .map_err(|_| "did not name its host in time".to_owned())??;
        let mut policy = self.policy.clone();
        if !domain_allowed(&policy.borrow().domains, &name) {
            return Err(format!("{name} (to {dst}) is not on the domain list"));
        }
        let sock = self.tcp_socket().await.map_err(|e| e.to_string())?;
        let mut up = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(SocketAddr::V4(dst)))
            .await
            .map_err(|_| format!("{dst} did not answer"))?
            .map_err(|e| format!("{dst}: {e}"))?;
        up.write_all(&head).await.map_err(|e| e.to_string())?;
        let still_allowed = async {
            while policy.changed().await.is_ok() {
                if !domain_allowed(&policy.borrow().domains, &name) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut guest, &mut up) => Ok(()),
            () = still_allowed => Err(format!("{name} left the domain list (or the guard stopped)")),
        }
    }
}

async fn dns_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DNS_MESSAGE];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = shared.queries.clone().try_acquire_owned() else { continue };
        let (q, sock, shared) = (buf[..n].to_vec(), sock.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = shared.answer(&q).await {
                let _ = sock.send_to(&reply, from).await;
            }
        });
    }
}

async fn proxy_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(why) = shared.relay(conn).await {
                tracing::info!(reason = %why, "egress guard: connection cut");
            }
        });
    }
}

/// Where a redirected connection was going (`SO_ORIGINAL_DST`).
fn original_dst(s: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, which is that large and
    // lives across the call; the descriptor is `s`'s, open while `s` is borrowed.
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_IP, libc::SO_ORIGINAL_DST, (&raw mut addr).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port)))
}

/// The guard's part of the policy transaction (after the forward chains): DNS to
/// 10.0.2.3 either goes to the host's resolver (no domains) or stays in the namespace for
/// the guard, which then also gets the web ports of `@guarded` addresses not already
/// allowed by a CIDR rule, and its own sockets' way out.
pub(super) fn script(egress: &Egress, resolver: Option<Ipv4Addr>) -> String {
    let mut t = String::new();
    for c in ["guardin", "guardout", "dnsnat", "guardnat"] {
        t.push_str(&format!("add chain inet vm {c}\nflush chain inet vm {c}\n"));
    }
    t.push_str(&format!("add set inet vm guarded {{ type ipv4_addr; flags timeout; size {MAX_LEARNT}; }}\n"));
    // Tables made before the guard had the resolver's DNAT inline here.
    t.push_str("flush chain inet vm pre\n");
    t.push_str(&format!("add rule inet vm pre iifname \"tap0\" ip daddr {DNS_IP} meta l4proto {{ tcp, udp }} th dport 53 jump dnsnat\n"));
    t.push_str("add rule inet vm pre iifname \"tap0\" jump guardnat\n");
    let web = "tcp dport { 80, 443 }";
    if !egress.guarded() {
        // DNS goes to the host's resolver; the connection is marked so the `dns` chain
        // can let it through while the policy allows any egress.
        if let Some(r) = resolver {
            t.push_str(&format!("add rule inet vm dnsnat ct mark set 0x53 dnat ip to {r}\n"));
        }
        return t;
    }
    for r in &egress.allow {
        for l in r.nft("return") {
            t.push_str(&format!("add rule inet vm guardnat {l}\n"));
        }
    }
    t.push_str(&format!("add rule inet vm guardnat ip daddr @guarded {web} redirect to :{PROXY_PORT}\n"));
    t.push_str(&format!("add rule inet vm guardin iifname \"tap0\" ip daddr {DNS_IP} udp dport 53 accept\n"));
    t.push_str(&format!("add rule inet vm guardin iifname \"tap0\" tcp dport {PROXY_PORT} ct status dnat accept\n"));
    if let Some(r) = resolver {
        t.push_str(&format!("add rule inet vm guardout oifname \"uplink\" ip daddr {r} udp dport 53 accept\n"));
    }
    for verdict in ["jump deny", "jump ceiling", "accept"] {
        t.push_str(&format!("add rule inet vm guardout oifname \"uplink\" ip daddr @guarded {web} {verdict}\n"));
    }
    t
}
