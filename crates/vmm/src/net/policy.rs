//! Egress policy as data: the closed ranges, the operator's ceiling, rules and a VM's
//! [`Egress`], rendered as nftables rules by [`super::NetNs`].

use super::NetError;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::sync::{PoisonError, RwLock};

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
pub(super) fn span(cidr: &str) -> Option<(u32, u32)> {
    let (addr, len) = cidr.split_once('/')?;
    let addr = u32::from(addr.parse::<Ipv4Addr>().ok()?);
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    let host = u32::MAX.checked_shr(len).unwrap_or(0);
    Some((addr & !host, addr | host))
}

/// True when the union of `open` (sorted by start) covers `from..=to`.
pub(super) fn covered(mut from: u32, to: u32, open: &[(u32, u32)]) -> bool {
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
    pub(super) fn nft(&self, verdict: &str) -> Vec<String> {
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
    pub(super) fn carries(&self, other: &Rule) -> bool {
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
pub(super) fn closed_set() -> String {
    CLOSED_RANGES.iter().map(|(cidr, _)| *cidr).collect::<Vec<_>>().join(", ")
}

impl Ceiling {
    /// The nftables rules of the `ceiling` chain: the operator's openings go on to the
    /// VM's policy, the rest of the closed ranges is dropped.
    pub(super) fn rules(&self) -> Vec<String> {
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
    /// Names (`example.com`, `*.example.org`, as [`normalize_domain`](super::normalize_domain)
    /// writes them) the guest may resolve through `10.0.2.3` and then reach on TCP 80 and
    /// 443, where the connection's TLS server name or HTTP Host is on the list too (the
    /// domain guard, `net::guard`). With domains, names off the list do not resolve;
    /// with `internet` too, domains add nothing ([`Egress::guarded`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
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

    /// True when the domain guard enforces `domains`: with `internet` every public name
    /// resolves and public addresses are reached anyway, so domains add nothing.
    pub fn guarded(&self) -> bool {
        !self.domains.is_empty() && !self.internet
    }

    /// True when the VM may reach anything (and so gets DNS).
    pub fn any(&self) -> bool {
        self.internet || !self.allow.is_empty() || !self.domains.is_empty()
    }

    /// Checks every rule and domain (in the form [`normalize_domain`](super::normalize_domain)
    /// writes, at most [`MAX_DOMAINS`](super::MAX_DOMAINS)).
    ///
    /// # Errors
    ///
    /// [`NetError::Rule`] or [`NetError::Domain`] naming the first bad one.
    pub fn validate(&self) -> Result<(), NetError> {
        for r in self.allow.iter().chain(&self.deny) {
            r.validate()?;
        }
        if self.domains.len() > super::MAX_DOMAINS {
            return Err(NetError::Domain(format!("{} domains, over the limit of {}", self.domains.len(), super::MAX_DOMAINS)));
        }
        for d in &self.domains {
            if super::normalize_domain(d)? != *d {
                return Err(NetError::Domain(format!("{d:?} is not in normal form (lower case, no trailing dot)")));
            }
        }
        Ok(())
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
        self.validate()?;
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
    pub(super) fn rules(&self) -> Vec<String> {
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
