//! Microvm networking: one network namespace per VM, with a tap device for QEMU, a veth
//! uplink to the host, NAT on both sides, and an nftables egress policy inside the
//! namespace.
//!
//! ```text
//!  guest eth0 10.0.2.15 ── tap0 (10.0.2.2 gateway, 10.0.2.3 DNS) ─┐  namespace hearth-<vm>
//!                                             uplink 10.200.a.b+2 ─┘  NAT, egress policy
//!                                                        │ veth
//!                          host hh<n> 10.200.a.b+1 ── host routing, NAT ── the world
//! ```
//!
//! Every VM sees the same addresses (guest `10.0.2.15/24`, gateway `10.0.2.2`, DNS
//! `10.0.2.3`, fixed MACs), so snapshot clones and resumed VMs find their network exactly as
//! the snapshot left it, while each runs in its own namespace with its own uplink address.
//! QEMU itself is started inside the namespace (it opens `tap0` there) and so cannot reach
//! the host's network either.
//!
//! The guest can never reach: the host (its input from any `hh*` uplink is dropped), other
//! VMs (forwarding between uplinks is dropped), or its own namespace. The [`CLOSED_RANGES`]
//! (private, CGNAT, loopback, link-local, multicast, reserved) it reaches only where the
//! operator opened them for the whole host, the host's [`Ceiling`]: the namespace drops
//! them, less the operator's openings, before the VM's own policy is looked at. What else
//! it may reach is its [`Egress`] policy, enforced in the namespace before NAT and
//! replaceable while the VM runs ([`NetNs::set_egress`]); a tenant's policy is checked
//! against the ceiling up front ([`Egress::within`]) so that a rule reaching further is
//! refused with a reason rather than silently cut. DNS queries to `10.0.2.3` are forwarded
//! to the host's resolver whenever the VM has any egress at all, even though outbound UDP
//! is otherwise blocked.
//!
//! The same policy serves work the host does for tenants: [`NetNs::create_local`] makes a
//! namespace without a VM whose own sockets (a thread that [`NetNs::enter`]s it) are
//! policed as a guest's traffic would be.
//!
//! This needs root (namespaces, tap devices, nftables) and the `nft` and `ip` tools.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The guest's address (the same in every VM).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's gateway: the namespace's end of the tap device.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's DNS server address, forwarded to the host's resolver.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's MAC address.
pub const GUEST_MAC: &str = "02:68:72:74:68:0f";
/// The gateway's MAC (fixed, so a clone's ARP cache stays right in a new namespace).
const GATEWAY_MAC: &str = "02:68:72:74:68:02";
/// Uplink addresses: one /30 per VM out of this /16.
const UPLINK_NET: [u8; 2] = [10, 200];
/// Uplinks available (a /16 of /30s).
const UPLINKS: u32 = 1 << 14;

pub mod dns;
mod domains;
mod guard;
mod policy;
pub mod sni;
pub use domains::*;
pub use guard::PROXY_PORT;
pub use policy::*;

/// Why networking could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not root.
    #[error("microVM networking needs root (network namespaces, tap devices, nftables); run as root, or without network")]
    NotRoot,
    /// A tool failed.
    #[error("{what} failed: {detail}; is `{}` done (it installs iproute2 and nftables)?", crate::home::SETUP_COMMAND)]
    Tool {
        /// The step.
        what: String,
        /// Its stderr.
        detail: String,
    },
    /// Every uplink address is taken.
    #[error("no free uplink address for another microVM network ({UPLINKS} in use)")]
    Exhausted,
    /// The VM was started without a network device.
    #[error("this VM has no network device (it was started or snapshotted without one)")]
    NoNetwork,
    /// A rule does not parse.
    #[error("bad egress rule {0}")]
    Rule(String),
    /// A domain of an allow list does not parse, or the list is too long.
    #[error("bad egress domain {0}")]
    Domain(String),
    /// An allow rule reaches into a closed range the operator has not opened.
    #[error(
        "egress rule {rule} reaches into {range} ({kind} addresses), which the operator has not opened to microVMs on this host; narrow the rule, or ask the operator to allow the range ({CEILING_SETTING} CIDR)"
    )]
    BeyondCeiling {
        /// The rule, as written.
        rule: String,
        /// The closed range.
        range: &'static str,
        /// What the range is (`private`, `link-local`...).
        kind: &'static str,
    },
}

fn tool(what: &str, cmd: &mut Command, stdin: Option<&str>) -> Result<(), NetError> {
    let fail = |detail: String| NetError::Tool { what: what.to_owned(), detail };
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Runs `cmd` (as [`tool`] does) inside the network namespace bound at `ns`.
fn tool_in_ns(what: &str, ns: &Path, cmd: &mut Command, stdin: Option<&str>) -> Result<(), NetError> {
    let f = std::fs::File::open(ns).map_err(|e| NetError::Tool { what: format!("open {}", ns.display()), detail: e.to_string() })?;
    let fd = f.as_raw_fd();
    // SAFETY: runs in the child between fork and exec and only calls setns(2), which is
    // async-signal-safe; `f` stays open until the child has been spawned and waited for.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = tool(what, cmd, stdin);
    drop(f);
    r
}

/// The environment variable naming the DNS server microVMs' queries go to (an IPv4
/// address), instead of the host's own resolver.
pub const DNS_ENV: &str = "HEARTH_DNS";

/// Where guests' DNS queries go: [`DNS_ENV`] if set, else the host's first IPv4 resolver
/// that a namespace can reach (not loopback): from `/etc/resolv.conf`, else
/// systemd-resolved's upstream list (its stub is loopback).
fn host_resolver() -> Option<Ipv4Addr> {
    if let Ok(v) = std::env::var(DNS_ENV) {
        match v.trim().parse::<Ipv4Addr>() {
            Ok(a) if !a.is_loopback() && !a.is_unspecified() => return Some(a),
            _ => tracing::warn!("{DNS_ENV}={v:?} is not a usable IPv4 address (not loopback); using the host's resolver"),
        }
    }
    let found = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"].iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(|a| !a.is_loopback())
    });
    if found.is_none() {
        tracing::warn!("no non-loopback IPv4 nameserver on the host: microVMs will have no DNS");
    }
    found
}

/// True when this process may set up networks.
pub fn can_network() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Host-wide set-up: forwarding on, and Hearth's host table — nothing from a VM's uplink
/// to the host itself (checked in prerouting, before any of the host's own DNAT could
/// turn a host address into a forwarded one), no DNATed traffic from uplinks, no
/// forwarding between uplinks, NAT of the uplink range. Applied on every network set-up
/// and policy change (one atomic transaction each, so concurrent processes are safe), so
/// a firewall reload that flushed the table is repaired by the next VM.
fn ensure_host() -> Result<(), NetError> {
    if !can_network() {
        return Err(NetError::NotRoot);
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| NetError::Tool { what: "enable IPv4 forwarding".into(), detail: e.to_string() })?;
    let net = format!("{}.{}.0.0/16", UPLINK_NET[0], UPLINK_NET[1]);
    // One transaction: create-if-missing, then replace the contents.
    let rules = format!(
        "table inet hearth {{}}\n\
         flush table inet hearth\n\
         table inet hearth {{\n\
           chain pre {{ type filter hook prerouting priority -300; policy accept; iifname \"hh*\" fib daddr type local drop; iifname \"hh*\" meta nfproto ipv6 drop; }}\n\
           chain input {{ type filter hook input priority -10; policy accept; iifname \"hh*\" drop; }}\n\
           chain forward {{ type filter hook forward priority -10; policy accept; iifname \"hh*\" oifname \"hh*\" drop; iifname \"hh*\" ct status dnat drop; iifname \"hh*\" ip daddr 169.254.0.0/16 drop; }}\n\
           chain post {{ type nat hook postrouting priority srcnat; policy accept; ip saddr {net} oifname != \"hh*\" masquerade; }}\n\
         }}\n"
    );
    tool("nft (host table)", Command::new("nft").arg("-f").arg("-"), Some(&rules))
}

/// What a namespace is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A VM's: a tap device for QEMU, the policy applied to what the guest forwards.
    Vm,
    /// A host process's: no tap device, the policy applied to the namespace's own sockets.
    Local,
}

/// A VM's network namespace, removed (with its devices) when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// The domain guard (DNS and SNI / Host checks) while the policy has domains.
    guard: std::sync::Mutex<Option<guard::Guard>>,
}

impl NetNs {
    /// Creates the namespace `hearth-<vm_id>` with its tap device, uplink and `egress`
    /// (under the host's [`Ceiling`]).
    pub fn create(vm_id: &str, egress: &Egress) -> Result<NetNs, NetError> {
        Self::make(vm_id, egress, Role::Vm)
    }

    /// Creates the namespace `hearth-<id>` for work the host does on a tenant's behalf (a
    /// code artifact download): an uplink and no tap device; what the namespace's own
    /// sockets send out follows `egress` and the host's ceiling exactly as a guest's traffic
    /// would, and the host stays out of reach. A thread [`enter`](NetNs::enter)s it to open
    /// sockets there.
    ///
    /// # Errors
    ///
    /// As [`NetNs::create`]: [`NetError::NotRoot`], [`NetError::Tool`],
    /// [`NetError::Exhausted`], [`NetError::Rule`].
    pub fn create_local(id: &str, egress: &Egress) -> Result<NetNs, NetError> {
        Self::make(id, egress, Role::Local)
    }

    /// Moves the calling thread into the namespace for the rest of its life: sockets it
    /// opens from then on, and threads it starts, live there. Only for a thread of its own
    /// that ends with the work (never a runtime's worker). The namespace lives while a
    /// thread is in it, even after this handle is dropped and its name removed.
    ///
    /// # Errors
    ///
    /// [`NetError::Tool`] when the namespace cannot be opened or entered.
    pub fn enter(&self) -> Result<(), NetError> {
        let fail = |e: std::io::Error| NetError::Tool { what: format!("enter network namespace {}", self.name), detail: e.to_string() };
        let f = std::fs::File::open(self.path()).map_err(fail)?;
        // SAFETY: setns(2) on a descriptor that `f` keeps open for the call; it changes the
        // calling thread's network namespace only, on which no memory safety depends.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn make(vm_id: &str, egress: &Egress, role: Role) -> Result<NetNs, NetError> {
        egress.validate()?;
        if role == Role::Local && egress.guarded() {
            return Err(NetError::Domain("domain allow lists apply to microVM networks only".into()));
        }
        ensure_host()?;
        let name = ns_name(vm_id);
        tool("ip netns add", Command::new("ip").args(["netns", "add", &name]), None)?;
        // From here on, dropping `ns` removes the namespace and everything in it.
        let ns = NetNs { name, guard: Default::default() };
        let idx = ns.add_uplink()?;
        let [a, b] = UPLINK_NET;
        let base = idx * 4;
        let (c, d) = ((base >> 8) as u8, (base & 0xff) as u8);
        let host_ip = format!("{a}.{b}.{c}.{}", d + 1);
        let ns_ip = format!("{a}.{b}.{c}.{}", d + 2);
        let host_dev = format!("hh{idx}");
        let host_batch = format!("addr add {host_ip}/30 dev {host_dev}\nlink set {host_dev} up\n");
        tool("ip (host uplink)", Command::new("ip").args(["-batch", "-"]), Some(&host_batch))?;
        let mut ns_batch = format!(
            "link set lo up\n\
             addr add {ns_ip}/30 dev uplink\n\
             link set uplink up\n\
             route add default via {host_ip}\n"
        );
        if role == Role::Vm {
            ns_batch.push_str(&format!(
                "tuntap add dev tap0 mode tap\n\
                 link set tap0 address {GATEWAY_MAC}\n\
                 addr add {GATEWAY_IP}/24 dev tap0\n\
                 addr add {DNS_IP}/32 dev tap0\n\
                 link set tap0 up\n"
            ));
        }
        tool("ip (namespace devices)", Command::new("ip").args(["-n", &ns.name, "-batch", "-"]), Some(&ns_batch))?;
        let mut sysctl = Command::new("sh");
        // IPv6 may be absent from the kernel altogether; the rules drop it anyway.
        sysctl.args([
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward && { echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; } 2>/dev/null; true",
        ]);
        tool_in_ns("namespace sysctls", &ns.path(), &mut sysctl, None)?;
        // The guard listens before the rules send the guest to it.
        ns.sync_guard(egress)?;
        ns.load_rules(egress, Some(role), true)?;
        Ok(ns)
    }

    /// Shapes the VM's traffic to [`IoLimits::net_mbit`](crate::limits::IoLimits) each
    /// way (nothing when unlimited): a `tbf` qdisc on `tap0` and on `uplink`
    /// ([`crate::limits`]). Qdiscs live with the devices: a reattached VM keeps them.
    ///
    /// # Errors
    ///
    /// [`NetError::Tool`] when `tc` fails.
    pub fn set_rate(&self, limits: &crate::limits::IoLimits) -> Result<(), NetError> {
        match limits.tc_batch() {
            None => Ok(()),
            Some(batch) => tool("tc (rate limit)", Command::new("tc").args(["-n", &self.name, "-batch", "-"]), Some(&batch)),
        }
    }

    /// The namespace `name` made earlier (by a process that released its VM).
    pub(crate) fn adopt(name: String) -> NetNs {
        NetNs { name, guard: Default::default() }
    }

    /// Keeps the namespace when this handle goes (its VM runs on, detached). Its domain
    /// guard stops: the process that takes the VM back starts its own
    /// ([`NetNs::set_egress`] on reattach).
    pub(crate) fn release(self) {
        let mut me = std::mem::ManuallyDrop::new(self);
        drop(me.guard.get_mut().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount (what `setns` opens).
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Replaces the VM's egress policy; takes effect for new connections at once, and
    /// for guarded connections (through the domain guard) whose name left the list.
    /// Addresses learnt from DNS answers are forgotten when the domains change.
    pub fn set_egress(&self, egress: &Egress) -> Result<(), NetError> {
        egress.validate()?;
        ensure_host()?;
        let changed = self.sync_guard(egress)?;
        self.load_rules(egress, None, changed)
    }

    /// Starts, updates or stops the domain guard for `egress`; true when its domains
    /// changed (or it started or stopped).
    fn sync_guard(&self, egress: &Egress) -> Result<bool, NetError> {
        let mut g = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let policy = guard::Policy { domains: std::sync::Arc::new(egress.domains.clone()), ceiling: effective_ceiling(egress) };
        match (g.as_ref(), !egress.guarded()) {
            (None, true) => Ok(false),
            (Some(_), true) => {
                *g = None;
                Ok(true)
            }
            (None, false) => {
                *g = Some(guard::Guard::start(&self.path(), policy, host_resolver())?);
                Ok(true)
            }
            (Some(running), false) => Ok(running.set(policy)),
        }
    }

    /// Adds the veth pair `hh<n>` (host) / `uplink` (namespace), taking the first free
    /// `n` after a random start: creation fails when the name exists, which makes it the
    /// allocator across processes.
    fn add_uplink(&self) -> Result<u32, NetError> {
        let start = u32::from_le_bytes(crate::identity::os_random()) % UPLINKS;
        for i in 0..UPLINKS {
            let idx = (start + i) % UPLINKS;
            let host_dev = format!("hh{idx}");
            match tool(
                "ip link add (uplink)",
                Command::new("ip").args(["link", "add", &host_dev, "type", "veth", "peer", "name", "uplink", "netns", &self.name]),
                None,
            ) {
                Ok(()) => return Ok(idx),
                Err(NetError::Tool { detail, .. }) if detail.contains("File exists") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(NetError::Exhausted)
    }

    /// Loads `egress` (with the table itself when the namespace is new, `create`),
    /// forgetting the addresses learnt from DNS answers with `forget`.
    fn load_rules(&self, egress: &Egress, create: Option<Role>, forget: bool) -> Result<(), NetError> {
        let mut t = policy_script(egress, &effective_ceiling(egress), host_resolver(), create);
        if forget {
            t.push_str("flush set inet vm guarded\n");
        }
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"]);
        tool_in_ns("nft (egress policy)", &self.path(), &mut cmd, Some(&t))
    }
}

/// The ceiling a VM's policy is held to: the host's, or — in the operator's process (no
/// host ceiling set) — the VM's own allow rules.
fn effective_ceiling(egress: &Egress) -> Ceiling {
    host_ceiling().unwrap_or_else(|| Ceiling { allow: egress.allow.clone() })
}

/// The nft transaction that sets a namespace's policy: the `inet vm` table when `create`
/// says the namespace is new, then in every case the `forward` chain and the policy's
/// chains, replaced whole (one transaction, so never half applied). Forwarded packets from
/// the guest — and, in a [`Role::Local`] namespace, the namespace's own — go through
/// `deny`, `dns` (marked DNS to the host's resolver), `ceiling`, then `egress`.
fn policy_script(egress: &Egress, ceiling: &Ceiling, resolver: Option<Ipv4Addr>, create: Option<Role>) -> String {
    let mut t = String::new();
    if let Some(role) = create {
        // A host process's sockets meet the guest's policy on their way out.
        let local = match role {
            Role::Vm => "",
            Role::Local => "oifname \"uplink\" meta nfproto != ipv4 drop; oifname \"uplink\" jump deny; oifname \"uplink\" jump ceiling; oifname \"uplink\" jump egress; ",
        };
        // Every packet from the guest is checked against the current policy, not only a
        // connection's first: revoking egress also stops connections already open.
        // Only replies coming back in are accepted by connection state.
        t.push_str(&format!(
            "table inet vm {{\n\
               chain pre {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
               chain post {{ type nat hook postrouting priority srcnat; policy accept; oifname \"uplink\" masquerade; }}\n\
               chain input {{ type filter hook input priority 0; policy drop; iifname \"lo\" accept; ct state established,related accept; jump guardin; }}\n\
               chain output {{ type filter hook output priority 0; policy drop; oifname \"lo\" accept; ct state established,related accept; {local}meta l4proto icmp accept; jump guardout; }}\n\
               chain forward {{ type filter hook forward priority 0; policy drop; }}\n\
               chain deny {{ }}\n\
               chain dns {{ }}\n\
               chain ceiling {{ }}\n\
               chain egress {{ }}\n\
               chain guardin {{ }}\n\
               chain guardout {{ }}\n\
             }}\n"
        ));
    }
    // Tables made before the ceiling existed get its chain and the jump to it here.
    t.push_str("add chain inet vm ceiling\nflush chain inet vm forward\n");
    for r in [
        "iifname \"uplink\" oifname \"tap0\" ct state established,related accept".to_owned(),
        "iifname \"tap0\" meta nfproto != ipv4 drop".to_owned(),
        format!("iifname \"tap0\" ip saddr != {GUEST_IP} drop"),
        "iifname \"tap0\" oifname \"uplink\" jump deny".to_owned(),
        "iifname \"tap0\" oifname \"uplink\" jump dns".to_owned(),
        "iifname \"tap0\" oifname \"uplink\" jump ceiling".to_owned(),
        "iifname \"tap0\" oifname \"uplink\" jump egress".to_owned(),
    ] {
        t.push_str(&format!("add rule inet vm forward {r}\n"));
    }
    for chain in ["deny", "dns", "ceiling", "egress"] {
        t.push_str(&format!("flush chain inet vm {chain}\n"));
    }
    t.push_str(&guard::script(egress, resolver));
    for r in &egress.deny {
        for l in r.nft("drop") {
            t.push_str(&format!("add rule inet vm deny {l}\n"));
        }
    }
    if egress.any() && resolver.is_some() {
        t.push_str("add rule inet vm dns ct mark 0x53 accept\n");
    }
    for r in ceiling.rules() {
        t.push_str(&format!("add rule inet vm ceiling {r}\n"));
    }
    for r in egress.rules() {
        t.push_str(&format!("add rule inet vm egress {r}\n"));
    }
    t
}

/// Every address on the host's interfaces (in the caller's network namespace), IPv4 and
/// IPv6, loopback included.
///
/// # Errors
///
/// The OS's, when the interfaces cannot be listed.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) stores a list it allocated in `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; its
        // `ifa_addr`, when not null, points to a sockaddr whose family says its type.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*sa.cast::<libc::sockaddr_in>();
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(list) };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes tap0 and the veth pair (both ends) with it.
        let _ = tool("ip netns del", Command::new("ip").args(["netns", "del", &self.name]), None);
    }
}

/// The namespace name of a VM.
pub(crate) fn ns_name(vm_id: &str) -> String {
    format!("hearth-{vm_id}")
}

/// Removes the namespace of a VM whose owner died (called by the run-directory sweep).
pub(crate) fn remove_stale(vm_id: &str) {
    let name = ns_name(vm_id);
    if Path::new("/run/netns").join(&name).exists() {
        let _ = tool("ip netns del", Command::new("ip").args(["netns", "del", &name]), None);
    }
}

/// The kernel command-line word that configures the guest's interface.
pub(crate) fn guest_cmdline() -> String {
    format!("hearth.net={GUEST_IP}/24,{GATEWAY_IP},{DNS_IP}")
}

#[cfg(test)]
mod tests;
