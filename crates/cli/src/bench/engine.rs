//! `hearth-bench engine`: the engine's numbers, measured side by side in one run.
//!
//! - cold boot (QEMU start → agent handshake) and boot → first exec result, busybox and
//!   (when built) debian-bookworm;
//! - exec round trip of `true` on a running VM, p50/p90/p99;
//! - host memory of one idle VM (RSS and PSS of its QEMU process).

use crate::report::{self, ms, proc_kib, Row};
use crate::vmargs::VmArgs;
use clap::Args;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::Vm;
use std::time::{Duration, Instant};

/// Options of `hearth-bench engine`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Cold boots per root filesystem.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// Exec round trips.
    #[arg(long, default_value_t = 200)]
    execs: usize,
    /// Also boot the debian-bookworm image (must be built).
    #[arg(long)]
    debian: bool,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

async fn cold_boots(args: &VmArgs, n: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut boot, mut first) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let cfg = args.config()?;
        let t0 = Instant::now();
        let vm = Vm::boot(cfg).await?;
        boot.push(ms(vm.boot_time()));
        let out = vm.exec(&ExecRequest::argv(["true"]), None, 1 << 20).await?;
        anyhow::ensure!(out.exit.success(), "`true` failed in the guest");
        first.push(ms(t0.elapsed()));
        vm.shutdown().await;
    }
    Ok((boot, first))
}

/// Runs the benchmarks.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let accel = hearth_vmm::accel::resolve(args.vm.accel);
    let mut rootfs = vec![args.vm.rootfs.clone()];
    if args.debian {
        rootfs.push("debian-bookworm".into());
    }
    for r in &rootfs {
        let mut a = args.vm.clone();
        a.rootfs = r.clone();
        eprintln!("cold boots ({r}) ×{}", args.boots);
        let (boot, first) = cold_boots(&a, args.boots).await?;
        rows.push(Row { name: format!("cold boot → agent ready ({r})"), samples: boot, unit: "ms" });
        rows.push(Row { name: format!("cold boot → first exec result ({r})"), samples: first, unit: "ms" });
    }

    eprintln!("exec round trips ×{}", args.execs);
    let vm = Vm::boot(args.vm.config()?).await?;
    let req = ExecRequest::argv(["true"]);
    // Warm up the exec path once.
    vm.exec(&req, None, 1 << 20).await?;
    let mut rtt = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        vm.exec(&req, None, 1 << 20).await?;
        rtt.push(ms(t.elapsed()));
    }
    rows.push(Row { name: "exec round trip of `true`".into(), samples: rtt, unit: "ms" });
    let mut hello = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        vm.agent().hello().await?;
        hello.push(ms(t.elapsed()));
    }
    rows.push(Row { name: "agent round trip (handshake request, no process)".into(), samples: hello, unit: "ms" });

    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = vm.pid();
    let rss = proc_kib(pid, "status", "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let pss = proc_kib(pid, "smaps_rollup", "Pss:").unwrap_or(0) as f64 / 1024.0;
    rows.push(Row { name: "idle VM host RSS (512 MiB guest)".into(), samples: vec![rss], unit: "MiB" });
    rows.push(Row { name: "idle VM host PSS (512 MiB guest)".into(), samples: vec![pss], unit: "MiB" });
    vm.shutdown().await;

    if !args.json {
        println!("accelerator: {accel}\n");
    }
    report::print(rows, args.json, serde_json::json!({ "accel": accel.to_string() }));
    Ok(())
}
