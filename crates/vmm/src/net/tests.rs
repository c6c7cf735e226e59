use super::policy::{covered, span};
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
        ..Egress::none()
    };
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
    let e = Egress { internet: true, allow: rules(&["10.0.0.0/8", "1.2.3.4:53/udp"]), deny: rules(&["8.8.8.8"]), ..Egress::none() };
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
    let e =
        Egress { internet: true, allow: rules(&["10.9.0.0/16:443/tcp", "1.2.3.4:53/udp"]), deny: rules(&["8.8.8.8"]), ..Egress::none() };
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

/// A policy with domains starts the guard (its DNS and proxy listening in the namespace,
/// the resolver's DNAT gone), and one without stops it (root only: skipped otherwise).
#[tokio::test]
async fn domains_start_and_stop_the_guard() {
    if !can_network() {
        eprintln!("skipped: needs root");
        return;
    }
    let guarded = Egress { domains: vec!["example.com".into()], allow: rules(&["1.2.3.4:443/tcp"]), ..Egress::none() };
    let ns = NetNs::create(&format!("tguard-{}", std::process::id()), &guarded).unwrap();
    let list = || {
        let o = Command::new("ip").args(["netns", "exec", ns.name(), "nft", "list", "table", "inet", "vm"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let listening = || {
        let o = Command::new("ip").args(["netns", "exec", ns.name(), "ss", "-lntu"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let t = list();
    assert!(t.contains(&format!("redirect to :{PROXY_PORT}")) && !t.contains("dnat ip to"), "{t}");
    assert!(t.contains("ip daddr 1.2.3.4 tcp dport 443 return"), "CIDR rules are not proxied: {t}");
    let ss = listening();
    assert!(ss.contains("10.0.2.3:53") && ss.contains(&format!(":{PROXY_PORT}")), "{ss}");
    assert!(ns.set_egress(&Egress { domains: vec!["Example.com".into()], ..Egress::none() }).is_err(), "a domain not in normal form");
    ns.set_egress(&Egress::internet()).unwrap();
    let t = list();
    assert!(!t.contains("redirect"), "{t}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!listening().contains(&format!(":{PROXY_PORT}")), "the guard outlived its domains");
}
