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

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{PoisonError, RwLock};

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

/// Address ranges guests reach only where the operator opened them for the whole host (a
/// [`Ceiling`]), and even then only with a rule of their own, each with what it is. The
/// host's own addresses are closed on top of these, whatever the ceiling, by the host's
/// table.
pub const CLOSED_RANGES: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

/// The operator setting that opens closed ranges, named where a rule is refused.
pub const CEILING_SETTING: &str = "hearth serve --egress-allow-private";

/// The closed range `addr` lies in and what it is (`("10.0.0.0/8", "private")`).
pub fn closed_range(addr: Ipv4Addr) -> Option<(&'static str, &'static str)> {
    let a = u32::from(addr);
    CLOSED_RANGES.iter().copied().find(|(cidr, _)| span(cidr).is_some_and(|(lo, hi)| lo <= a && a <= hi))
}

/// `a.b.c.d/n` as its first and last address.
fn span(cidr: &str) -> Option<(u32, u32)> {
    let (addr, len) = cidr.split_once('/')?;
    let addr = u32::from(addr.parse::<Ipv4Addr>().ok()?);
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    let host = u32::MAX.checked_shr(len).unwrap_or(0);
    Some((addr & !host, addr | host))
}

/// True when the union of `open` (sorted by start) covers `from..=to`.
fn covered(mut from: u32, to: u32, open: &[(u32, u32)]) -> bool {
    for &(lo, hi) in open {
        if lo > from {
            return false;
        }
        if hi >= to {
            return true;
        }
        // `hi < to`, so `hi + 1` cannot overflow.
        from = from.max(hi + 1);
    }
    false
}

/// The operator's ceiling on egress for every microVM of the host: the destinations in the
/// [`CLOSED_RANGES`] that guests may reach at all. A VM's own allow rules only narrow it.
/// The namespace enforces it ahead of the VM's policy, so a policy that reaches further
/// (a bug in validation included) is cut to it; [`Egress::within`] refuses such a policy
/// up front.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ceiling {
    /// Destinations in the closed ranges the operator opens ([`CEILING_SETTING`]).
    pub allow: Vec<Rule>,
}

/// The host's ceiling in this process; `None` until [`set_host_ceiling`].
static HOST_CEILING: RwLock<Option<Ceiling>> = RwLock::new(None);

/// Sets the ceiling of every namespace this process creates or re-polices from now on
/// (`hearth serve` does, from its flags, before any VM starts; namespaces made earlier keep
/// theirs until their policy is next set).
///
/// A process that never sets one (`None`) is the operator's own: each VM's allow rules are
/// its ceiling, as with `hearth vm run --allow` run by root.
pub fn set_host_ceiling(ceiling: Option<Ceiling>) {
    *HOST_CEILING.write().unwrap_or_else(PoisonError::into_inner) = ceiling;
}

/// The ceiling set by [`set_host_ceiling`], if any: what tenants' policies must stay within.
pub fn host_ceiling() -> Option<Ceiling> {
    HOST_CEILING.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// A transport protocol in an egress rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP and UDP (and anything else for rules without ports).
    #[default]
    Any,
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
}

/// One egress rule: destinations in `cidr`, optionally only `proto` and ports
/// `ports.0..=ports.1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Destination network, `a.b.c.d/n`.
    pub cidr: String,
    /// Protocol.
    #[serde(default)]
    pub proto: Proto,
    /// Port range (inclusive); all ports when absent.
    #[serde(default)]
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    /// Parses `CIDR[:PORT[-PORT]][/tcp|/udp]`, e.g. `93.184.0.0/16:443/tcp` or `1.1.1.1`.
    pub fn parse(s: &str) -> Result<Rule, NetError> {
        let bad = |why: &str| NetError::Rule(format!("{s:?}: {why} (expected CIDR[:PORT[-PORT]][/tcp|/udp])"));
        let (body, proto) = match s.rsplit_once('/') {
            Some((b, "tcp")) => (b, Proto::Tcp),
            Some((b, "udp")) => (b, Proto::Udp),
            _ => (s, Proto::Any),
        };
        let (net, ports) = match body.split_once(':') {
            Some((n, p)) => {
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let lo: u16 = lo.parse().map_err(|_| bad("bad port"))?;
                let hi: u16 = hi.parse().map_err(|_| bad("bad port"))?;
                if lo == 0 || lo > hi {
                    return Err(bad("bad port range"));
                }
                (n, Some((lo, hi)))
            }
            None => (body, None),
        };
        let cidr = if net.contains('/') { net.to_owned() } else { format!("{net}/32") };
        let r = Rule { cidr, proto, ports };
        r.validate()?;
        Ok(r)
    }

    /// Checks the CIDR and ports.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |why: &str| NetError::Rule(format!("{}: {why}", self.cidr));
        let (addr, len) = self.cidr.split_once('/').ok_or_else(|| bad("not a CIDR"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let len: u32 = len.parse().map_err(|_| bad("bad prefix length"))?;
        if len > 32 {
            return Err(bad("prefix length over 32"));
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if u32::from(addr) & !mask != 0 {
            return Err(bad("host bits set"));
        }
        if let Some((lo, hi)) = self.ports {
            if lo == 0 || lo > hi {
                return Err(bad("bad port range"));
            }
        }
        Ok(())
    }

    /// The rule as nftables match expressions (one line per protocol).
    fn nft(&self, verdict: &str) -> Vec<String> {
        let protos: &[&str] = match (self.proto, self.ports) {
            (Proto::Tcp, _) => &["tcp"],
            (Proto::Udp, _) => &["udp"],
            (Proto::Any, Some(_)) => &["tcp", "udp"],
            (Proto::Any, None) => &[""],
        };
        protos
            .iter()
            .map(|p| {
                let mut l = format!("ip daddr {}", self.cidr);
                if !p.is_empty() {
                    l.push_str(&format!(" meta l4proto {p}"));
                }
                if let Some((lo, hi)) = self.ports {
                    let ports = if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") };
                    l.push_str(&format!(" th dport {ports}"));
                }
                format!("{l} {verdict}")
            })
            .collect()
    }

    /// True when `self`'s protocol and ports take in all of `other`'s (networks aside).
    fn carries(&self, other: &Rule) -> bool {
        let proto = self.proto == Proto::Any || self.proto == other.proto;
        let ports = match (self.ports, other.ports) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((lo, hi)), Some((a, b))) => lo <= a && b <= hi,
        };
        proto && ports
    }
}

/// The rule as [`Rule::parse`] reads it: `CIDR[:PORT[-PORT]][/tcp|/udp]`.
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.cidr)?;
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}")?,
            Some((lo, hi)) => write!(f, ":{lo}-{hi}")?,
            None => {}
        }
        f.write_str(match self.proto {
            Proto::Any => "",
            Proto::Tcp => "/tcp",
            Proto::Udp => "/udp",
        })
    }
}

/// The closed ranges as an nftables set body.
fn closed_set() -> String {
    CLOSED_RANGES.iter().map(|(cidr, _)| *cidr).collect::<Vec<_>>().join(", ")
}

impl Ceiling {
    /// The nftables rules of the `ceiling` chain: the operator's openings go on to the
    /// VM's policy, the rest of the closed ranges is dropped.
    fn rules(&self) -> Vec<String> {
        let mut out: Vec<String> = self.allow.iter().flat_map(|r| r.nft("return")).collect();
        out.push(format!("ip daddr {{ {} }} drop", closed_set()));
        out
    }
}

/// What a VM may reach. Evaluated in order: `deny` rules, the host's [`Ceiling`], `allow`
/// rules, then — with `internet` — any public address over TCP (and ICMP); everything else
/// is dropped. Closed ranges are reached only where both the ceiling and an allow rule
/// open them; outbound UDP (DNS aside) is closed unless allowed; the host always is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    /// Public addresses over TCP (the `INTERNET_EGRESS` connector).
    #[serde(default)]
    pub internet: bool,
    /// Destinations allowed even when private or UDP.
    #[serde(default)]
    pub allow: Vec<Rule>,
    /// Destinations refused even when `internet` or `allow` would let them through.
    #[serde(default)]
    pub deny: Vec<Rule>,
}

impl Egress {
    /// No egress at all (a NIC with nothing behind it).
    pub fn none() -> Self {
        Egress::default()
    }

    /// Public internet over TCP, DNS through the host's resolver.
    pub fn internet() -> Self {
        Egress { internet: true, ..Default::default() }
    }

    /// True when the VM may reach anything (and so gets DNS).
    pub fn any(&self) -> bool {
        self.internet || !self.allow.is_empty()
    }

    /// Checks that the policy stays under `ceiling`: wherever an allow rule reaches into a
    /// closed range, the operator's rules must open all of it, for the rule's protocol and
    /// ports. Deny rules and `internet` (public addresses only) always fit.
    ///
    /// # Errors
    ///
    /// [`NetError::Rule`] for a malformed rule, [`NetError::BeyondCeiling`] naming the first
    /// rule that reaches further and the closed range it reaches into.
    ///
    /// # Example
    ///
    /// ```
    /// use hearth_vmm::net::{Ceiling, Egress, Rule};
    /// let ceiling = Ceiling { allow: vec![Rule::parse("10.1.0.0/16").unwrap()] };
    /// let db = Egress { allow: vec![Rule::parse("10.1.2.3:5432/tcp").unwrap()], ..Egress::internet() };
    /// assert!(db.within(&ceiling).is_ok());
    /// let lan = Egress { allow: vec![Rule::parse("10.0.0.0/8").unwrap()], ..Egress::none() };
    /// assert!(lan.within(&ceiling).is_err());
    /// ```
    pub fn within(&self, ceiling: &Ceiling) -> Result<(), NetError> {
        for r in &self.allow {
            r.validate()?;
            let (lo, hi) = span(&r.cidr).ok_or_else(|| NetError::Rule(format!("{}: not a CIDR", r.cidr)))?;
            let mut open: Vec<(u32, u32)> = ceiling.allow.iter().filter(|o| o.carries(r)).filter_map(|o| span(&o.cidr)).collect();
            open.sort_unstable();
            for &(range, kind) in CLOSED_RANGES {
                let Some((clo, chi)) = span(range) else { continue };
                let (from, to) = (lo.max(clo), hi.min(chi));
                if from <= to && !covered(from, to, &open) {
                    return Err(NetError::BeyondCeiling { rule: r.to_string(), range, kind });
                }
            }
        }
        Ok(())
    }

    /// The nftables rules of the `egress` chain (deny rules and the ceiling have their own
    /// chains, evaluated before this one).
    fn rules(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.allow {
            out.extend(r.nft("accept"));
        }
        if self.internet {
            // The ceiling may have let an opened range through: `internet` alone does not
            // reach it, an allow rule must.
            out.push(format!("ip daddr {{ {} }} drop", closed_set()));
            out.push("meta l4proto { tcp, icmp } accept".into());
        }
        out
    }
}

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
        for r in egress.allow.iter().chain(&egress.deny) {
            r.validate()?;
        }
        ensure_host()?;
        let name = ns_name(vm_id);
        tool("ip netns add", Command::new("ip").args(["netns", "add", &name]), None)?;
        // From here on, dropping `ns` removes the namespace and everything in it.
        let ns = NetNs { name };
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
        ns.load_rules(egress, Some(role))?;
        Ok(ns)
    }

    /// The namespace `name` made earlier (by a process that released its VM).
    pub(crate) fn adopt(name: String) -> NetNs {
        NetNs { name }
    }

    /// Keeps the namespace when this handle goes (its VM runs on, detached).
    pub(crate) fn release(self) {
        std::mem::forget(self);
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount (what `setns` opens).
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Replaces the VM's egress policy; takes effect for new connections at once.
    pub fn set_egress(&self, egress: &Egress) -> Result<(), NetError> {
        for r in egress.allow.iter().chain(&egress.deny) {
            r.validate()?;
        }
        ensure_host()?;
        self.load_rules(egress, None)
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

    /// Loads `egress` (with the table itself when the namespace is new, `create`).
    fn load_rules(&self, egress: &Egress, create: Option<Role>) -> Result<(), NetError> {
        // The operator's process (no host ceiling set): the VM's own allow rules are it.
        let ceiling = host_ceiling().unwrap_or_else(|| Ceiling { allow: egress.allow.clone() });
        let t = policy_script(egress, &ceiling, host_resolver(), create);
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"]);
        tool_in_ns("nft (egress policy)", &self.path(), &mut cmd, Some(&t))
    }
}

/// The nft transaction that sets a namespace's policy: the `inet vm` table when `create`
/// says the namespace is new, then in every case the `forward` chain and the policy's
/// chains, replaced whole (one transaction, so never half applied). Forwarded packets from
/// the guest — and, in a [`Role::Local`] namespace, the namespace's own — go through
/// `deny`, `dns` (marked DNS to the host's resolver), `ceiling`, then `egress`.
fn policy_script(egress: &Egress, ceiling: &Ceiling, resolver: Option<Ipv4Addr>, create: Option<Role>) -> String {
    let mut t = String::new();
    if let Some(role) = create {
        // DNS to 10.0.2.3 goes to the host's resolver; the connection is marked so the
        // `dns` chain can let it through while the policy allows any egress.
        let dns = resolver
            .map(|r| format!("iifname \"tap0\" ip daddr {DNS_IP} meta l4proto {{ tcp, udp }} th dport 53 ct mark set 0x53 dnat ip to {r}"))
            .unwrap_or_default();
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
               chain pre {{ type nat hook prerouting priority dstnat; policy accept; {dns}; }}\n\
               chain post {{ type nat hook postrouting priority srcnat; policy accept; oifname \"uplink\" masquerade; }}\n\
               chain input {{ type filter hook input priority 0; policy drop; iifname \"lo\" accept; ct state established,related accept; }}\n\
               chain output {{ type filter hook output priority 0; policy drop; oifname \"lo\" accept; ct state established,related accept; {local}meta l4proto icmp accept; }}\n\
               chain forward {{ type filter hook forward priority 0; policy drop; }}\n\
               chain deny {{ }}\n\
               chain dns {{ }}\n\
               chain ceiling {{ }}\n\
               chain egress {{ }}\n\
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
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_render() {
        let r = Rule::parse("93.184.0.0/16:443/tcp").unwrap();
        assert_eq!(r, Rule { cidr: "93.184.0.0/16".into(), proto: Proto::Tcp, ports: Some((443, 443)) });
        assert_eq!(r.nft("accept"), vec!["ip daddr 93.184.0.0/16 meta l4proto tcp th dport 443 accept"]);
        let r = Rule::parse("1.1.1.1").unwrap();
        assert_eq!(r.cidr, "1.1.1.1/32");
        assert_eq!(r.nft("drop"), vec!["ip daddr 1.1.1.1/32 drop"]);
        let r = Rule::parse("10.0.0.0/8:8000-8100").unwrap();
        assert_eq!(r.nft("accept").len(), 2, "ports without a protocol mean TCP and UDP");
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "nonsense", "1.2.3.4:0", "1.2.3.4:9-3", "1.2.3.4:x", "::1"] {
            assert!(Rule::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn egress_order_is_allow_then_internet() {
        let e = Egress { internet: true, allow: vec![Rule::parse("192.168.1.0/24").unwrap()], deny: vec![Rule::parse("8.8.8.8").unwrap()] };
        let r = e.rules();
        assert!(!r.iter().any(|l| l.contains("8.8.8.8")), "deny rules live in their own chain");
        assert!(r[0].ends_with("accept") && r[0].contains("192.168.1.0/24"));
        assert!(r[1].contains("10.0.0.0/8") && r[1].ends_with("drop"));
        assert_eq!(r[2], "meta l4proto { tcp, icmp } accept");
        assert!(Egress::none().rules().is_empty());
        assert!(!Egress::none().any());
    }

    fn rules(list: &[&str]) -> Vec<Rule> {
        list.iter().map(|r| Rule::parse(r).unwrap()).collect()
    }

    #[test]
    fn closed_ranges_parse_and_classify() {
        for (cidr, _) in CLOSED_RANGES {
            assert!(span(cidr).is_some() && Rule::parse(cidr).is_ok(), "{cidr}");
        }
        assert_eq!(closed_range(Ipv4Addr::new(10, 1, 2, 3)), Some(("10.0.0.0/8", "private")));
        assert_eq!(closed_range(Ipv4Addr::new(100, 64, 0, 1)).map(|c| c.1), Some("shared (CGNAT)"));
        assert_eq!(closed_range(Ipv4Addr::new(169, 254, 169, 254)).map(|c| c.1), Some("link-local"));
        assert_eq!(closed_range(Ipv4Addr::new(255, 255, 255, 255)).map(|c| c.1), Some("reserved"));
        assert_eq!(closed_range(Ipv4Addr::new(100, 128, 0, 1)), None);
        assert_eq!(closed_range(Ipv4Addr::new(93, 184, 216, 34)), None);
        assert_eq!(span("0.0.0.0/0"), Some((0, u32::MAX)));
        assert_eq!(span("1.2.3.4/32"), Some((0x0102_0304, 0x0102_0304)));
    }

    #[test]
    fn rules_print_as_they_parse() {
        for r in ["10.0.0.0/8", "1.1.1.1/32:53/udp", "93.184.0.0/16:8000-8100/tcp", "10.0.0.0/8:80"] {
            assert_eq!(Rule::parse(r).unwrap().to_string(), r);
        }
    }

    #[test]
    fn policies_within_the_ceiling_pass() {
        let ceiling = Ceiling { allow: rules(&["10.1.0.0/16", "192.168.0.0/17", "192.168.128.0/17", "172.16.5.5:5432/tcp"]) };
        let ok = |allow: &[&str]| Egress { allow: rules(allow), ..Egress::internet() }.within(&ceiling);
        // Public destinations are the tenant's to allow; narrower private ones too.
        ok(&["93.184.0.0/16", "8.8.8.8:53/udp"]).unwrap();
        ok(&["10.1.0.0/16", "10.1.2.3:443/tcp"]).unwrap();
        // Covered by two openings together.
        ok(&["192.168.0.0/16"]).unwrap();
        ok(&["172.16.5.5:5432/tcp"]).unwrap();
        // Deny rules and internet alone never need the operator.
        Egress { deny: rules(&["10.0.0.0/8", "0.0.0.0/0"]), ..Egress::internet() }.within(&Ceiling::default()).unwrap();
        Egress::none().within(&Ceiling::default()).unwrap();
    }

    #[test]
    fn policies_beyond_the_ceiling_are_refused_naming_rule_and_range() {
        let ceiling = Ceiling { allow: rules(&["10.1.0.0/16", "172.16.5.5:5432/tcp"]) };
        let refused = |allow: &str| match (Egress { allow: rules(&[allow]), ..Egress::none() }).within(&ceiling) {
            Err(NetError::BeyondCeiling { rule, range, kind }) => (rule, range, kind),
            other => panic!("{allow}: {other:?}"),
        };
        assert_eq!(refused("10.0.0.0/8"), ("10.0.0.0/8".into(), "10.0.0.0/8", "private"));
        assert_eq!(refused("10.2.0.1"), ("10.2.0.1/32".into(), "10.0.0.0/8", "private"));
        assert_eq!(refused("169.254.169.254:80/tcp").2, "link-local");
        assert_eq!(refused("100.64.0.0/10").2, "shared (CGNAT)");
        assert_eq!(refused("127.0.0.1").2, "loopback");
        assert_eq!(refused("224.0.0.251:5353/udp").2, "multicast");
        // Everything, or a public range with a closed one inside it.
        assert_eq!(refused("0.0.0.0/0").1, "0.0.0.0/8");
        assert_eq!(refused("192.0.0.0/2").1, "192.168.0.0/16");
        // The operator opened one TCP port: other ports, UDP or every protocol are wider.
        for wider in ["172.16.5.5:5433/tcp", "172.16.5.5:5432/udp", "172.16.5.5:5432", "172.16.5.5"] {
            assert_eq!(refused(wider).1, "172.16.0.0/12", "{wider}");
        }
        let msg = Egress { allow: rules(&["10.0.0.0/8:22/tcp"]), ..Egress::none() }.within(&Ceiling::default()).unwrap_err().to_string();
        assert!(msg.contains("10.0.0.0/8:22/tcp") && msg.contains("private") && msg.contains(CEILING_SETTING), "{msg}");
    }

    #[test]
    fn the_ceiling_is_enforced_before_the_policy() {
        let ceiling = Ceiling { allow: rules(&["10.1.0.0/16:443/tcp"]) };
        let e = Egress { internet: true, allow: rules(&["10.0.0.0/8", "1.2.3.4:53/udp"]), deny: rules(&["8.8.8.8"]) };
        let t = policy_script(&e, &ceiling, Some(Ipv4Addr::new(192, 168, 1, 1)), Some(Role::Vm));
        let pos = |needle: &str| t.find(needle).unwrap_or_else(|| panic!("no {needle:?} in\n{t}"));
        // The forward chain: deny, DNS (to a resolver the operator chose, private or not),
        // the ceiling, and only then the VM's own rules.
        assert!(pos("oifname \"uplink\" jump deny") < pos("oifname \"uplink\" jump dns"));
        assert!(pos("oifname \"uplink\" jump dns") < pos("oifname \"uplink\" jump ceiling"));
        assert!(pos("oifname \"uplink\" jump ceiling") < pos("oifname \"uplink\" jump egress"));
        // The ceiling chain lets the operator's opening through, then drops every closed range.
        let returns = pos("add rule inet vm ceiling ip daddr 10.1.0.0/16 meta l4proto tcp th dport 443 return");
        let drop = pos(&format!("add rule inet vm ceiling ip daddr {{ {} }} drop", closed_set()));
        assert!(returns < drop && drop < pos("add rule inet vm egress ip daddr 10.0.0.0/8 accept"));
        assert!(t.contains("add rule inet vm deny ip daddr 8.8.8.8/32 drop"));
        // A VM namespace's own sockets get nothing; a local one's meet the policy.
        assert!(!t.contains("oifname \"uplink\" jump ceiling; "));
        let local = policy_script(&e, &ceiling, None, Some(Role::Local));
        assert!(local.contains(
            "oifname \"uplink\" jump deny; oifname \"uplink\" jump ceiling; oifname \"uplink\" jump egress; meta l4proto icmp accept"
        ));
        // A policy change rebuilds the forward chain too (tables older than the ceiling).
        let change = policy_script(&e, &Ceiling::default(), None, None);
        assert!(!change.contains("table inet vm {"));
        assert!(change.starts_with("add chain inet vm ceiling\nflush chain inet vm forward\n"));
        assert!(change.contains("jump ceiling") && !change.contains("return"));
    }

    #[test]
    fn coverage_of_unions() {
        assert!(covered(5, 10, &[(0, 4), (5, 7), (8, 20)]));
        assert!(covered(5, 10, &[(0, 100)]));
        assert!(!covered(5, 10, &[(0, 6), (8, 20)]));
        assert!(!covered(5, 10, &[(6, 20)]));
        assert!(!covered(5, 10, &[]));
        assert!(covered(0, u32::MAX, &[(0, u32::MAX)]));
    }

    /// The rules load as nftables reads them, in both kinds of namespace, and nothing is
    /// left once the handles go (root only: skipped otherwise).
    #[test]
    fn namespaces_load_the_policy_and_leave_nothing() {
        if !can_network() {
            eprintln!("skipped: needs root");
            return;
        }
        let e = Egress { internet: true, allow: rules(&["10.9.0.0/16:443/tcp", "1.2.3.4:53/udp"]), deny: rules(&["8.8.8.8"]) };
        let id = |kind: &str| format!("t{kind}-{}", std::process::id());
        let list = |ns: &NetNs| {
            let o = Command::new("ip").args(["netns", "exec", ns.name(), "nft", "list", "table", "inet", "vm"]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let vm = NetNs::create(&id("vm"), &e).unwrap();
        let local = NetNs::create_local(&id("local"), &e).unwrap();
        for ns in [&vm, &local] {
            let t = list(ns);
            assert!(t.contains("jump ceiling") && t.contains("10.9.0.0/16 tcp dport 443 return"), "{t}");
            ns.set_egress(&Egress::none()).unwrap();
            assert!(!list(ns).contains("return"), "{}", list(ns));
        }
        assert!(list(&local).contains("oifname \"uplink\" jump egress"));
        let paths = [vm.path(), local.path()];
        drop((vm, local));
        for p in paths {
            assert!(!p.exists(), "{} left behind", p.display());
        }
    }

    #[test]
    fn host_addresses_include_loopback() {
        let a = host_addresses().unwrap();
        assert!(a.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{a:?}");
    }
}
