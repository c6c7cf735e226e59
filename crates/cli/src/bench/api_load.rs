//! The load half of `hearth-bench api`: sustained RunMicrovm → exec → TerminateMicrovm
//! from several clients (against the engine's own sustained rate in the same run, with
//! the CPU one launch costs), GetMicrovm latency during a storm of concurrent launches
//! (against GetMicrovm on a quiet daemon), and what idle microvms cost the host (PSS and
//! CPU per VM). Each result is checked against the goal of issue 16; the output says by
//! how much a missed goal was missed.
//!
//! The machine these run on may be shared: CPU is counted in ticks of the processes
//! involved (`/proc/<pid>/stat`), not inferred from wall time, and each baseline is taken
//! in the same run as what it is compared with.

use crate::daemon::BenchDaemon;
use crate::report::{ms, pct, proc_kib, Row};
use hearth_api::client::Client;
use serde_json::json;
use std::time::{Duration, Instant};

/// What one goal asked and what was measured.
pub struct Goal {
    /// What is measured.
    pub what: String,
    /// The measured value.
    pub value: f64,
    /// The goal.
    pub goal: f64,
    /// True when lower is better.
    pub lower_is_better: bool,
    /// The unit.
    pub unit: &'static str,
}

impl Goal {
    /// `met` or `missed by …`.
    pub fn verdict(&self) -> String {
        let met = if self.lower_is_better { self.value <= self.goal } else { self.value >= self.goal };
        if met {
            return "met".into();
        }
        let by = (self.value - self.goal).abs();
        format!("missed by {by:.2} {} ({:.0} %)", self.unit, by / self.goal.abs().max(f64::EPSILON) * 100.0)
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        let cmp = if self.lower_is_better { "≤" } else { "≥" };
        format!("- {}: {:.2} {} (goal {cmp} {} {}): {}", self.what, self.value, self.unit, self.goal, self.unit, self.verdict())
    }
}

/// Ticks of CPU (user + system) of process `pid`, and of its reaped children when
/// `children`.
fn ticks(pid: u32, children: bool) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime, stime, cutime, cstime are the
    // 12th to 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(4).map(|v| v.parse().unwrap_or(0)).collect();
    let own = f.first().copied().unwrap_or(0) + f.get(1).copied().unwrap_or(0);
    if children {
        own + f.get(2).copied().unwrap_or(0) + f.get(3).copied().unwrap_or(0)
    } else {
        own
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// The QEMU processes whose command line names a path under `run_root` (this benchmark's
/// daemon's VMs, pooled or not), by pid.
fn qemus(run_root: &std::path::Path) -> Vec<u32> {
    let needle = run_root.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let text = String::from_utf8_lossy(&cmd);
        if text.contains("qemu-system") && text.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// CPU seconds spent by this process (the daemon runs in it), its reaped children (QEMUs
/// that ended) and the QEMUs of `run_root` still running, as a closure that returns the
/// seconds spent since it was made. A QEMU alive at the start and reaped before the end
/// counts its whole life; pooled VMs are paused, so that is small.
fn cpu_meter(run_root: std::path::PathBuf) -> impl Fn() -> f64 {
    let me = std::process::id();
    let live = |root: &std::path::Path| qemus(root).into_iter().map(|p| (p, ticks(p, false))).collect::<std::collections::HashMap<_, _>>();
    let (t0, q0) = (ticks(me, true), live(&run_root));
    move || {
        let q1 = live(&run_root);
        let qemu: u64 = q1.iter().map(|(p, t)| t.saturating_sub(q0.get(p).copied().unwrap_or(0))).sum();
        (ticks(me, true).saturating_sub(t0) + qemu) as f64 / clock_ticks()
    }
}

async fn run_exec_terminate(c: &Client) -> anyhow::Result<()> {
    let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
    anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
    let id = m["microvmId"].as_str().unwrap_or_default().to_owned();
    let out = c.call(http::Method::POST, &format!("/hearth/v1/microvms/{id}/exec"), Some(&json!({ "command": ["true"] }))).await?;
    anyhow::ensure!(out["exitCode"] == 0, "exec answered {out}");
    c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
    Ok(())
}

/// `clients` loops of RunMicrovm → exec → TerminateMicrovm for `secs`: cycles per second,
/// CPU milliseconds per cycle, and each cycle's duration.
pub async fn api_sustained(d: &BenchDaemon, clients: usize, secs: u64) -> anyhow::Result<(f64, f64, Vec<f64>)> {
    let cpu = cpu_meter(d.vm.run_root.clone());
    let t = Instant::now();
    let until = t + Duration::from_secs(secs);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let c = d.client.clone();
            tokio::spawn(async move {
                let mut cycles = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    run_exec_terminate(&c).await?;
                    cycles.push(ms(t.elapsed()));
                }
                anyhow::Ok(cycles)
            })
        })
        .collect();
    let mut cycles = Vec::new();
    for w in workers {
        cycles.extend(w.await??);
    }
    let (wall, spent) = (t.elapsed().as_secs_f64(), cpu());
    let n = cycles.len().max(1) as f64;
    Ok((cycles.len() as f64 / wall, spent * 1000.0 / n, cycles))
}

/// The engine's own sustained rate, `clients` at a time, from a template of the same
/// root filesystem: launch → exec → kill, per second, and CPU milliseconds per launch.
pub async fn engine_sustained(d: &BenchDaemon, clients: usize, secs: u64) -> anyhow::Result<(f64, f64)> {
    let snap = std::sync::Arc::new(engine_template(d).await?);
    let opts = hearth_vmm::RestoreOptions { run_root: d.vm.run_root.clone(), ..hearth_vmm::RestoreOptions::new() };
    let cpu = cpu_meter(d.vm.run_root.clone());
    let t = Instant::now();
    let until = t + Duration::from_secs(secs);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (snap, opts) = (snap.clone(), opts.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let vm = hearth_vmm::Vm::launch(&snap, &opts).await?;
                    vm.exec(&hearth_proto::exec::ExecRequest::argv(["true"]), None, 1 << 16).await?;
                    vm.kill().await;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut n = 0;
    for w in workers {
        n += w.await??;
    }
    let (wall, spent) = (t.elapsed().as_secs_f64(), cpu());
    Ok((n as f64 / wall, spent * 1000.0 / n.max(1) as f64))
}

/// The engine's template of the busybox root filesystem (booted once, kept in the
/// benchmark's state directory and reused).
pub async fn engine_template(d: &BenchDaemon) -> anyhow::Result<hearth_vmm::Snapshot> {
    let dir = d.state.path().join("engine-template");
    if let Ok(s) = hearth_vmm::Snapshot::open(&dir) {
        return Ok(s);
    }
    let mut cfg = d.vm.clone();
    cfg.root = Some(hearth_vmm::Disk::base(hearth_image::base::Base::Busybox.path(&d.home), hearth_vmm::DiskFormat::Raw));
    cfg.memory = hearth_vmm::Memory::SnapshotReady;
    let vm = hearth_vmm::Vm::boot(cfg).await?;
    vm.exec(&hearth_proto::exec::ExecRequest::argv(["true"]), None, 1 << 16).await?;
    Ok(vm.snapshot_template(&dir).await?)
}

/// GetMicrovm latencies of one microvm, every 20 ms until `stop`.
fn getter(c: Client, id: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<Vec<f64>> {
    tokio::spawn(async move {
        let mut lat = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            if c.call(http::Method::GET, &format!("/2025-09-09/microvms/{id}"), None).await.is_ok() {
                lat.push(ms(t.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lat
    })
}

/// GetMicrovm on a quiet daemon (`quiet_calls` calls), then during `n` concurrent
/// RunMicrovm: (quiet latencies, storm latencies, launch latencies).
pub async fn storm(d: &BenchDaemon, n: usize, quiet_calls: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let c = &d.client;
    let run = |c: Client| async move {
        let t = Instant::now();
        let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
        anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
        anyhow::Ok((m["microvmId"].as_str().unwrap_or_default().to_owned(), ms(t.elapsed())))
    };
    let (probe, _) = run(c.clone()).await?;
    let mut quiet = Vec::new();
    for _ in 0..quiet_calls {
        let t = Instant::now();
        c.call(http::Method::GET, &format!("/2025-09-09/microvms/{probe}"), None).await?;
        quiet.push(ms(t.elapsed()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gets = getter(c.clone(), probe.clone(), stop.clone());
    let launches: Vec<_> = (0..n).map(|_| tokio::spawn(run(c.clone()))).collect();
    let (mut ids, mut took, mut failed) = (vec![probe], Vec::new(), Vec::new());
    for l in launches {
        match l.await? {
            Ok((id, t)) => {
                ids.push(id);
                took.push(t);
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let during = gets.await?;
    for id in &ids {
        let _ = c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await;
    }
    anyhow::ensure!(failed.is_empty(), "{} of {n} concurrent launches failed: {}", failed.len(), failed.join("; "));
    Ok((quiet, during, took))
}

/// `n` idle microvms (pool disabled): after they settle, each QEMU's PSS (MiB) and the CPU
/// of all of them over a window, in % of one core per VM.
pub async fn idle(d: &BenchDaemon, n: usize) -> anyhow::Result<(Vec<f64>, f64)> {
    let c = &d.client;
    let mut ids = Vec::new();
    let result = async {
        for _ in 0..n {
            let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
            anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
            ids.push(m["microvmId"].as_str().unwrap_or_default().to_owned());
        }
        // Let launches' work (page faults, the agent's first requests) finish.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pids = qemus(&d.vm.run_root);
        anyhow::ensure!(pids.len() >= n, "found {} QEMU processes for {n} idle microvms", pids.len());
        let t0: u64 = pids.iter().map(|p| ticks(*p, false)).sum();
        let window = Duration::from_secs(20);
        tokio::time::sleep(window).await;
        let t1: u64 = pids.iter().map(|p| ticks(*p, false)).sum();
        let cpu = t1.saturating_sub(t0) as f64 / clock_ticks() / window.as_secs_f64() * 100.0 / pids.len() as f64;
        let pss = pids.iter().map(|p| proc_kib(*p, "smaps_rollup", "Pss:").unwrap_or(0) as f64 / 1024.0).collect();
        anyhow::Ok((pss, cpu))
    }
    .await;
    for id in &ids {
        let _ = c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await;
    }
    result
}

/// How many idle microvms this host can hold for the measurement: `want`, or fewer when
/// the memory available would not hold them at 64 MiB each (their PSS with headroom).
pub fn idle_capacity(want: usize) -> usize {
    let avail_mib = proc_kib_of("/proc/meminfo", "MemAvailable:").unwrap_or(0) / 1024;
    want.min((avail_mib / 64) as usize)
}

fn proc_kib_of(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The load measurements as report rows and goal lines.
pub struct Load {
    /// Table rows.
    pub rows: Vec<Row>,
    /// Goals checked.
    pub goals: Vec<Goal>,
}

/// Options of the load half.
pub struct LoadOptions {
    /// Concurrent clients of the sustained run.
    pub clients: usize,
    /// Seconds of each sustained run (API and engine).
    pub sustain_secs: u64,
    /// Concurrent launches of the storm.
    pub storm: usize,
    /// Idle microvms (0 skips).
    pub idle: usize,
}

/// Runs the load measurements against `d` (its pool size set by the caller).
pub async fn run(d: &BenchDaemon, o: &LoadOptions) -> anyhow::Result<Load> {
    let (mut rows, mut goals) = (Vec::new(), Vec::new());
    if o.sustain_secs > 0 {
        eprintln!("engine: launch → exec → kill, {} at a time for {} s (baseline)", o.clients, o.sustain_secs);
        let (engine_rate, engine_cpu) = engine_sustained(d, o.clients, o.sustain_secs).await?;
        eprintln!("API: RunMicrovm → exec → TerminateMicrovm, {} clients for {} s (warm pool of 2)", o.clients, o.sustain_secs);
        d.set_pool_size(2).await?;
        d.pool_ready(2).await?;
        let (rate, cpu, cycles) = api_sustained(d, o.clients, o.sustain_secs).await?;
        d.set_pool_size(0).await?;
        rows.push(Row {
            name: format!("baseline: engine launch → exec → kill, {} at a time", o.clients),
            samples: vec![engine_rate],
            unit: "per s",
        });
        rows.push(Row { name: "baseline: engine CPU per launch (all processes)".into(), samples: vec![engine_cpu], unit: "ms" });
        rows.push(Row {
            name: format!("RunMicrovm → exec → TerminateMicrovm, {} clients (API)", o.clients),
            samples: vec![rate],
            unit: "per s",
        });
        rows.push(Row { name: "CPU per RunMicrovm → exec → TerminateMicrovm (daemon + QEMU)".into(), samples: vec![cpu], unit: "ms" });
        rows.push(Row { name: format!("one cycle, {} clients (API)", o.clients), samples: cycles, unit: "ms" });
        goals.push(Goal {
            what: format!("sustained API rate, {} clients, vs the engine's in this run", o.clients),
            value: rate,
            goal: (engine_rate * 100.0).round() / 100.0,
            lower_is_better: false,
            unit: "per s",
        });
    }
    if o.storm > 0 {
        eprintln!("GetMicrovm quiet, then during {} concurrent RunMicrovm", o.storm);
        let (mut quiet, mut during, launches) = storm(d, o.storm, 50).await?;
        quiet.sort_by(f64::total_cmp);
        during.sort_by(f64::total_cmp);
        let p99 = pct(&during, 0.99);
        rows.push(Row { name: "baseline: GetMicrovm, quiet daemon".into(), samples: quiet, unit: "ms" });
        rows.push(Row { name: format!("GetMicrovm during {} concurrent RunMicrovm", o.storm), samples: during, unit: "ms" });
        rows.push(Row { name: format!("RunMicrovm → RUNNING, {} at once", o.storm), samples: launches, unit: "ms" });
        goals.push(Goal {
            what: format!("GetMicrovm p99 during {} launches", o.storm),
            value: p99,
            goal: 20.0,
            lower_is_better: true,
            unit: "ms",
        });
    }
    if o.idle > 0 {
        let n = idle_capacity(o.idle);
        if n < o.idle {
            eprintln!("idle: this host's available memory holds {n} of the {} idle microvms asked for", o.idle);
        }
        eprintln!("{n} idle microvms: PSS and CPU per VM");
        let (pss, cpu) = idle(d, n).await?;
        let mut sorted = pss.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = pct(&sorted, 0.5);
        rows.push(Row { name: format!("idle microvm host PSS ({n} VMs)"), samples: pss, unit: "MiB" });
        rows.push(Row { name: format!("idle microvm host CPU, per VM ({n} VMs)"), samples: vec![cpu], unit: "% of a core" });
        goals.push(Goal { what: format!("idle PSS p50, {n} VMs"), value: p50, goal: 40.0, lower_is_better: true, unit: "MiB" });
        goals.push(Goal { what: format!("idle CPU per VM, {n} VMs"), value: cpu, goal: 0.2, lower_is_better: true, unit: "% of a core" });
    }
    Ok(Load { rows, goals })
}
