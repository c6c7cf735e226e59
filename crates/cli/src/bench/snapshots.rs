//! `hearth-bench snapshots`: launch, suspend/resume, density and throughput of snapshots,
//! with a cold boot measured in the same run as the baseline.

use crate::report::{self, ms, proc_kib, Row};
use crate::vmargs::VmArgs;
use clap::Args;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::pool::Pool;
use hearth_vmm::{Memory, RestoreOptions, Snapshot, Vm};
use std::time::{Duration, Instant};

/// Options of `hearth-bench snapshots`.
#[derive(Args, Debug)]
pub struct BenchSnapArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Launches measured, pooled and unpooled each.
    #[arg(long, default_value_t = 20)]
    launches: usize,
    /// Warm pool size.
    #[arg(long, default_value_t = 2)]
    pool: usize,
    /// MiB of guest memory dirtied before each suspend.
    #[arg(long, default_value_t = 200)]
    dirty_mib: usize,
    /// Suspend/resume cycles.
    #[arg(long, default_value_t = 3)]
    cycles: usize,
    /// Guest memory in MiB of the large-session case: a template holding `--big-state-mib`
    /// of data in RAM, launched, then suspended and resumed at once (0 skips it; 4096 with
    /// 2048 is the multi-gigabyte case).
    #[arg(long, default_value_t = 0)]
    big_memory_mib: u32,
    /// MiB of data the large template holds in RAM (tmpfs).
    #[arg(long, default_value_t = 2048)]
    big_state_mib: usize,
    /// Idle VMs started from one snapshot for the density measurement (0 skips it).
    #[arg(long, default_value_t = 50)]
    idle_vms: usize,
    /// Seconds of sustained launching (0 skips it).
    #[arg(long, default_value_t = 60)]
    sustain_secs: u64,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

async fn first_exec(vm: &Vm) -> anyhow::Result<()> {
    let out = vm.exec(&ExecRequest::argv(["true"]), None, 1 << 16).await?;
    anyhow::ensure!(out.exit.success(), "`true` failed");
    Ok(())
}

/// The large-session case: a template of `--big-memory-mib` holding `--big-state-mib` in
/// tmpfs, one launch, then suspend/resume cycles with nothing dirtied.
async fn large_session(args: &BenchSnapArgs, opts: &RestoreOptions, work: &std::path::Path) -> anyhow::Result<Vec<Row>> {
    let mut cfg = args.vm.config()?;
    cfg.memory_mib = args.big_memory_mib;
    cfg.memory = Memory::SnapshotReady;
    let vm = Vm::boot(cfg).await?;
    // tmpfs holds half of RAM by default.
    vm.exec(&ExecRequest::shell("mount -o remount,size=95% /dev/shm"), None, 1 << 16).await?;
    // Made in the guest (an upload of gigabytes through the agent takes minutes under TCG):
    // non-zero pages are what matters, not their entropy.
    let fill = format!("yes hearth-large-session | head -c {} > /dev/shm/state", args.big_state_mib << 20);
    let out = vm.exec(&ExecRequest::shell(&fill), None, 1 << 16).await?;
    anyhow::ensure!(out.exit.success(), "filling tmpfs failed: {}", out.stderr_str());
    let big = vm.snapshot_template(&work.join("big-template")).await?;
    let what = format!("{} MiB guest, {} MiB state", args.big_memory_mib, args.big_state_mib);
    let t = Instant::now();
    let vm = Vm::launch(&big, opts).await?;
    first_exec(&vm).await?;
    let launched = ms(t.elapsed());
    vm.kill().await;
    let mut rows = vec![Row { name: format!("launch → first exec result ({what})"), samples: vec![launched], unit: "ms" }];
    let cycles = suspend_cycles(&big, opts, &work.join("big"), args.cycles.min(2), 0).await?;
    rows.extend(cycles.rows(&format!("{what}, nothing dirtied")));
    Ok(rows)
}

/// What a series of suspend/resume cycles measured.
pub(crate) struct Cycles {
    pub(crate) suspend: Vec<f64>,
    pub(crate) on_disk: Vec<f64>,
    pub(crate) resumed: Vec<f64>,
    pub(crate) resumed_exec: Vec<f64>,
}

impl Cycles {
    fn rows(self, what: &str) -> Vec<Row> {
        vec![
            Row { name: format!("suspend ({what})"), samples: self.suspend, unit: "ms" },
            Row { name: format!("suspend image on disk, allocated ({what})"), samples: self.on_disk, unit: "MiB" },
            Row { name: format!("resume → agent ready ({what})"), samples: self.resumed, unit: "ms" },
            Row { name: format!("resume → first exec result ({what})"), samples: self.resumed_exec, unit: "ms" },
        ]
    }
}

/// Launches a VM from `snap`, then `cycles` times: writes `dirty_mib` MiB into its tmpfs
/// (new bytes each cycle), suspends it into `dir` and resumes it, up to a first exec.
pub(crate) async fn suspend_cycles(
    snap: &Snapshot,
    opts: &RestoreOptions,
    dir: &std::path::Path,
    cycles: usize,
    dirty_mib: usize,
) -> anyhow::Result<Cycles> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Cycles { suspend: Vec::new(), on_disk: Vec::new(), resumed: Vec::new(), resumed_exec: Vec::new() };
    let mut vm = Vm::launch(snap, opts).await?;
    first_exec(&vm).await?;
    for cycle in 0..cycles {
        if dirty_mib > 0 {
            let mut data = pseudo_random(dirty_mib << 20);
            data[0] = cycle as u8;
            // The upload writes a new file before replacing the old one: make room first.
            vm.exec(&ExecRequest::argv(["rm", "-f", "/dev/shm/dirty"]), None, 1 << 16).await?;
            vm.agent().write_file_bytes(&BinPath::from("/dev/shm/dirty"), None, bytes::Bytes::from(data)).await?;
        }
        let t = Instant::now();
        let s = match vm.suspend(dir).await {
            Ok(s) => s,
            Err((_, e)) => return Err(e.into()),
        };
        out.suspend.push(ms(t.elapsed()));
        let blocks: u64 = ["state", "memory.json", "manifest.json"]
            .iter()
            .filter_map(|f| std::fs::metadata(s.path(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        out.on_disk.push(blocks as f64 / f64::from(1 << 20));
        let t = Instant::now();
        vm = Vm::resume(&s, opts).await?;
        hearth_vmm::restore::finish_resume(dir);
        out.resumed.push(ms(t.elapsed()));
        first_exec(&vm).await?;
        out.resumed_exec.push(ms(t.elapsed()));
    }
    vm.kill().await;
    Ok(out)
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Runs the benchmarks.
pub async fn run(args: BenchSnapArgs) -> anyhow::Result<()> {
    let home = hearth_vmm::home::hearth_home();
    let work = tempfile::Builder::new().prefix("bench-").tempdir_in(&home)?;
    let opts = RestoreOptions { run_root: home.join("run"), timeout: Duration::from_secs(120), ..RestoreOptions::new() };
    let mut rows: Vec<Row> = Vec::new();

    eprintln!("template");
    let mut cfg = args.vm.config()?;
    cfg.memory = Memory::SnapshotReady;
    let vm = Vm::boot(cfg).await?;
    first_exec(&vm).await?;
    let snap = vm.snapshot_template(&work.path().join("template")).await?;

    eprintln!("cold boots");
    let mut cold = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let vm = Vm::boot(args.vm.config()?).await?;
        first_exec(&vm).await?;
        cold.push(ms(t.elapsed()));
        vm.kill().await;
    }
    rows.push(Row { name: "cold boot → first exec result".into(), samples: cold, unit: "ms" });

    eprintln!("unpooled launches ×{}", args.launches);
    let (mut unpooled, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..args.launches {
        let t = Instant::now();
        let vm = Vm::launch(&snap, &opts).await?;
        ready.push(ms(t.elapsed()));
        first_exec(&vm).await?;
        unpooled.push(ms(t.elapsed()));
        vm.kill().await;
    }
    rows.push(Row { name: "launch from snapshot → agent ready (unpooled)".into(), samples: ready, unit: "ms" });
    rows.push(Row { name: "launch from snapshot → first exec result (unpooled)".into(), samples: unpooled, unit: "ms" });

    eprintln!("pooled launches ×{} (pool of {})", args.launches, args.pool);
    let pool = Pool::new(Snapshot::open(&snap.dir)?, opts.clone(), args.pool);
    let (mut pooled, mut claimed) = (Vec::new(), Vec::new());
    for _ in 0..args.launches {
        pool.wait_full().await;
        let t = Instant::now();
        let vm = pool.claim().await?;
        claimed.push(ms(t.elapsed()));
        first_exec(&vm).await?;
        pooled.push(ms(t.elapsed()));
        vm.kill().await;
    }
    drop(pool);
    rows.push(Row { name: "claim from warm pool → agent ready (pooled)".into(), samples: claimed, unit: "ms" });
    rows.push(Row { name: "launch from snapshot → first exec result (pooled)".into(), samples: pooled, unit: "ms" });

    eprintln!("suspend/resume ×{} with nothing dirtied", args.cycles);
    let clean = suspend_cycles(&snap, &opts, &work.path().join("clean"), args.cycles, 0).await?;
    rows.extend(clean.rows(&format!("{} MiB guest, nothing dirtied since launch", args.vm.memory)));

    eprintln!("suspend/resume ×{} with {} MiB dirtied", args.cycles, args.dirty_mib);
    let dirty = suspend_cycles(&snap, &opts, &work.path().join("dirty"), args.cycles, args.dirty_mib).await?;
    rows.extend(dirty.rows(&format!("{} MiB guest, {} MiB dirtied", args.vm.memory, args.dirty_mib)));

    if args.big_memory_mib > 0 {
        eprintln!("large session: {} MiB guest holding {} MiB", args.big_memory_mib, args.big_state_mib);
        // A failure here (a host too small) still reports what was measured above.
        match large_session(&args, &opts, work.path()).await {
            Ok(big) => rows.extend(big),
            Err(e) => eprintln!("large session skipped: {e:#}"),
        }
    }

    if args.idle_vms > 0 {
        eprintln!("{} idle VMs from one snapshot", args.idle_vms);
        let mut vms = Vec::new();
        for _ in 0..args.idle_vms {
            vms.push(Vm::launch(&snap, &opts).await?);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pids: Vec<u32> = vms.iter().map(Vm::pid).collect();
        let t0: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        let window = Duration::from_secs(10);
        tokio::time::sleep(window).await;
        let t1: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu = (t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0;
        let pss: Vec<f64> = pids.iter().map(|p| proc_kib(*p, "smaps_rollup", "Pss:").unwrap_or(0) as f64 / 1024.0).collect();
        let rss: Vec<f64> = pids.iter().map(|p| proc_kib(*p, "status", "VmRSS:").unwrap_or(0) as f64 / 1024.0).collect();
        rows.push(Row { name: format!("idle VM host PSS ({} VMs)", args.idle_vms), samples: pss, unit: "MiB" });
        rows.push(Row { name: format!("idle VM host RSS ({} VMs)", args.idle_vms), samples: rss, unit: "MiB" });
        rows.push(Row { name: format!("host CPU of all {} idle VMs (% of one core)", args.idle_vms), samples: vec![cpu], unit: "%" });
        for vm in vms {
            vm.kill().await;
        }
    }

    if args.sustain_secs > 0 {
        eprintln!("sustained launches for {} s", args.sustain_secs);
        let until = Instant::now() + Duration::from_secs(args.sustain_secs);
        let worker = || async {
            let mut n = 0u64;
            while Instant::now() < until {
                let vm = Vm::launch(&snap, &opts).await?;
                first_exec(&vm).await?;
                vm.kill().await;
                n += 1;
            }
            anyhow::Ok(n)
        };
        let (a, b) = tokio::join!(worker(), worker());
        let rate = (a? + b?) as f64 / args.sustain_secs as f64;
        rows.push(Row { name: "sustained launch → exec → kill, 2 at a time".into(), samples: vec![rate], unit: "per s" });
    }

    report::print(rows, args.json, serde_json::json!({}));
    Ok(())
}
