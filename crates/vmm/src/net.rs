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
//! VMs (forwarding between uplinks is dropped), or its own namespace. What else it may reach
//! is its [`Egress`] policy, enforced in the namespace before NAT and replaceable while the
//! VM runs ([`NetNs::set_egress`]). DNS queries to `10.0.2.3` are forwarded to the host's
//! resolver whenever the VM has any egress at all, even though outbound UDP is otherwise
//! blocked.
//!
//! This needs root (namespaces, tap devices, nftables) and the `nft` and `ip` tools.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
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

/// Address ranges a VM with internet egress still cannot reach unless a rule allows them:
/// private, loopback, link-local, shared, multicast and reserved ranges.
pub const PRIVATE_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

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
}

/// What a VM may reach. Evaluated in order: `deny` rules, `allow` rules, then — with
/// `internet` — any public address over TCP (and ICMP); everything else is dropped.
/// Private ranges, outbound UDP (DNS aside) and the host are closed unless allowed.
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

    /// The nftables rules of the `egress` chain (the deny rules have their own chain,
    /// evaluated before DNS and this one).
    fn rules(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.allow {
            out.extend(r.nft("accept"));
        }
        if self.internet {
            out.push(format!("ip daddr {{ {} }} drop", PRIVATE_RANGES.join(", ")));
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

/// A VM's network namespace, removed (with its devices) when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace `hearth-<vm_id>` with its tap device, uplink and `egress`.
    pub fn create(vm_id: &str, egress: &Egress) -> Result<NetNs, NetError> {
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
        let ns_batch = format!(
            "link set lo up\n\
             addr add {ns_ip}/30 dev uplink\n\
             link set uplink up\n\
             route add default via {host_ip}\n\
             tuntap add dev tap0 mode tap\n\
             link set tap0 address {GATEWAY_MAC}\n\
             addr add {GATEWAY_IP}/24 dev tap0\n\
             addr add {DNS_IP}/32 dev tap0\n\
             link set tap0 up\n"
        );
        tool("ip (namespace devices)", Command::new("ip").args(["-n", &ns.name, "-batch", "-"]), Some(&ns_batch))?;
        let mut sysctl = Command::new("sh");
        // IPv6 may be absent from the kernel altogether; the rules drop it anyway.
        sysctl.args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && { echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; } 2>/dev/null; true"]);
        tool_in_ns("namespace sysctls", &ns.path(), &mut sysctl, None)?;
        ns.load_rules(egress, true)?;
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
        self.load_rules(egress, false)
    }

    /// Adds the veth pair `hh<n>` (host) / `uplink` (namespace), taking the first free
    /// `n` after a random start: creation fails when the name exists, which makes it the
    /// allocator across processes.
    fn add_uplink(&self) -> Result<u32, NetError> {
        let start = {
            let mut b = [0u8; 4];
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                let _ = std::io::Read::read_exact(&mut f, &mut b);
            }
            u32::from_le_bytes(b) % UPLINKS
        };
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

    fn load_rules(&self, egress: &Egress, first: bool) -> Result<(), NetError> {
        let resolver = host_resolver();
        let mut t = String::new();
        if first {
            // DNS to 10.0.2.3 goes to the host's resolver; the connection is marked so the
            // `dns` chain can let it through while the policy allows any egress.
            let dns = resolver
                .map(|r| format!("iifname \"tap0\" ip daddr {DNS_IP} meta l4proto {{ tcp, udp }} th dport 53 ct mark set 0x53 dnat ip to {r}"))
                .unwrap_or_default();
            // Every packet from the guest is checked against the current policy, not only a
            // connection's first: revoking egress also stops connections already open.
            // Only replies coming back in are accepted by connection state.
            t.push_str(&format!(
                "table inet vm {{\n\
                   chain pre {{ type nat hook prerouting priority dstnat; policy accept; {dns}; }}\n\
                   chain post {{ type nat hook postrouting priority srcnat; policy accept; oifname \"uplink\" masquerade; }}\n\
                   chain input {{ type filter hook input priority 0; policy drop; iifname \"lo\" accept; ct state established,related accept; }}\n\
                   chain output {{ type filter hook output priority 0; policy drop; oifname \"lo\" accept; ct state established,related accept; meta l4proto icmp accept; }}\n\
                   chain forward {{ type filter hook forward priority 0; policy drop;\n\
                     iifname \"uplink\" oifname \"tap0\" ct state established,related accept;\n\
                     iifname \"tap0\" meta nfproto != ipv4 drop;\n\
                     iifname \"tap0\" ip saddr != {GUEST_IP} drop;\n\
                     iifname \"tap0\" oifname \"uplink\" jump deny;\n\
                     iifname \"tap0\" oifname \"uplink\" jump dns;\n\
                     iifname \"tap0\" oifname \"uplink\" jump egress;\n\
                   }}\n\
                   chain deny {{ }}\n\
                   chain dns {{ }}\n\
                   chain egress {{ }}\n\
                 }}\n"
            ));
        }
        t.push_str("flush chain inet vm deny\nflush chain inet vm dns\nflush chain inet vm egress\n");
        for r in &egress.deny {
            for l in r.nft("drop") {
                t.push_str(&format!("add rule inet vm deny {l}\n"));
            }
        }
        if egress.any() && resolver.is_some() {
            t.push_str("add rule inet vm dns ct mark 0x53 accept\n");
        }
        for r in egress.rules() {
            t.push_str(&format!("add rule inet vm egress {r}\n"));
        }
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"]);
        tool_in_ns("nft (egress policy)", &self.path(), &mut cmd, Some(&t))
    }
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
        let e = Egress {
            internet: true,
            allow: vec![Rule::parse("192.168.1.0/24").unwrap()],
            deny: vec![Rule::parse("8.8.8.8").unwrap()],
        };
        let r = e.rules();
        assert!(!r.iter().any(|l| l.contains("8.8.8.8")), "deny rules live in their own chain");
        assert!(r[0].ends_with("accept") && r[0].contains("192.168.1.0/24"));
        assert!(r[1].contains("10.0.0.0/8") && r[1].ends_with("drop"));
        assert_eq!(r[2], "meta l4proto { tcp, icmp } accept");
        assert!(Egress::none().rules().is_empty());
        assert!(!Egress::none().any());
    }
}
