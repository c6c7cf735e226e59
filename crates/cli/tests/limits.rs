//! Per-VM I/O limits against real QEMU VMs: the root drive's throttle is in QEMU's
//! `query-block` and a guest writing past it takes at least as long as the limit says;
//! the network rate is a tbf qdisc on both devices of the VM's namespace; both come back
//! on a VM resumed from its suspend and on a fork's copy (with the limits it is given), which get
//! them from their restore options, not from the snapshot.

mod common;

use common::config;
use hearth_image::base::Base;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{IoLimits, RestoreOptions, Vm};
use std::time::{Duration, Instant};

const BPS: u64 = 2 << 20;
const IOPS: u64 = 5000;
const MBIT: u32 = 8;

async fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec(&ExecRequest::shell(script), None, 1 << 20).await.unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.exit.success(), "{script}: exit {:?}, stderr {}", out.exit, out.stderr_str());
    out.stdout_str()
}

/// The root drive's throttle as `query-block` reports it: (bps, iops).
async fn throttle(vm: &Vm) -> (u64, u64) {
    let blocks = vm.qmp("query-block", None).await.unwrap();
    let root = blocks.as_array().unwrap().iter().find(|b| b["device"] == "root").unwrap_or_else(|| panic!("no root drive: {blocks}"));
    let i = &root["inserted"];
    (i["bps"].as_u64().unwrap(), i["iops"].as_u64().unwrap())
}

/// `tc -s qdisc show` in the VM's namespace.
fn qdiscs(vm: &Vm) -> String {
    let ns = vm.netns().expect("the VM has a namespace");
    let o = std::process::Command::new("tc").args(["-n", ns, "-s", "qdisc", "show"]).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_rate(vm: &Vm) {
    let q = qdiscs(vm);
    for dev in ["tap0", "uplink"] {
        let line = q
            .lines()
            .find(|l| l.contains("qdisc tbf") && l.contains(&format!("dev {dev} ")))
            .unwrap_or_else(|| panic!("no tbf on {dev}:\n{q}"));
        assert!(line.contains(&format!("rate {MBIT}Mbit")), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_network_limits_hold_and_survive_a_resume() {
    if !hearth_vmm::net::can_network() {
        eprintln!("skipped: networking needs root and ip/nft/tc");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let limits = IoLimits { disk_bps: BPS, disk_iops: IOPS, net_mbit: MBIT };
    let mut cfg = config(Base::Busybox);
    cfg.limits = limits;
    cfg.network = Some(hearth_vmm::net::Egress::none());
    let vm = Vm::boot(cfg).await.unwrap();
    assert_eq!(throttle(&vm).await, (BPS, IOPS));
    assert_rate(&vm);

    // A write of 8 MiB, flushed to the disk, at 2 MiB/s: at least 4 s (less QEMU's
    // bucket of a tenth of a second's worth); TCG only makes it slower.
    let mib = 8;
    let started = Instant::now();
    sh(&vm, &format!("dd if=/dev/zero of=/workspace/fill bs=1M count={mib} conv=fsync 2>/dev/null")).await;
    let took = started.elapsed();
    let floor = Duration::from_secs_f64((mib << 20) as f64 / BPS as f64 * 0.8);
    eprintln!("{mib} MiB under {BPS} B/s took {took:?} (floor {floor:?})");
    assert!(took >= floor, "{mib} MiB at {BPS} B/s took only {took:?}");

    // Suspended and resumed: the new QEMU's drive and namespace are limited again.
    let snap = match vm.suspend(&tmp.path().join("suspended")).await {
        Ok(s) => s,
        Err((_, e)) => panic!("suspend: {e}"),
    };
    let opts = RestoreOptions { limits, ..RestoreOptions::new() };
    let vm = Vm::resume(&snap, &opts).await.unwrap();
    assert_eq!(throttle(&vm).await, (BPS, IOPS));
    assert_rate(&vm);
    // Other limits given on restore win over what the VM had: they are the operator's now.
    let mut vm = vm;
    let fork = vm.fork_snapshot(&tmp.path().join("fork")).await.unwrap();
    let other = IoLimits { disk_bps: BPS * 2, disk_iops: 0, net_mbit: 0 };
    let clone = Vm::launch_fork(&fork, &RestoreOptions { limits: other, ..RestoreOptions::new() }).await.unwrap();
    assert_eq!(throttle(&clone).await, (BPS * 2, 0));
    assert!(!qdiscs(&clone).contains("tbf"), "{}", qdiscs(&clone));
    clone.kill().await;
    vm.kill().await;
}
