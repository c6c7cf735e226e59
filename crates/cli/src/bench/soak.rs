//! `hearth-bench soak`: the daemon under repetition, through its API, watching for what
//! leaks. Three phases against one in-process daemon (docs/RELIABILITY.md records a run):
//!
//! 1. **Suspend/resume cycles** of one microvm: a background process started once and a
//!    file appended every cycle must both survive every cycle.
//! 2. **Run → exec → terminate cycles**: the process's open descriptors, its RSS and the
//!    state directory's size sampled before, halfway and after; with `--check`, growth past
//!    small bounds fails the command (descriptors and disk are exact resources, not times).
//! 3. **Concurrent RunMicrovm**: N at once while GetMicrovm is called in a loop; its
//!    latency percentiles are recorded, every launch must reach RUNNING.
//!
//! Nothing here asserts a duration: speed is reported, leaks are checked.

use crate::report::{self, ms, Row};
use clap::Args;
use hearth_api::client::Client;
use serde_json::{json, Value};
use std::time::Instant;

/// Options of `hearth-bench soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Suspend/resume cycles of one microvm.
    #[arg(long, default_value_t = 100)]
    cycles: usize,
    /// Run → exec → terminate cycles.
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// RunMicrovm calls at once.
    #[arg(long, default_value_t = 30)]
    concurrent: usize,
    /// Fail when descriptors, RSS or disk grew past their bounds over the run cycles.
    #[arg(long)]
    check: bool,
    /// Accelerator.
    #[arg(long, default_value = "auto", env = "HEARTH_ACCEL")]
    accel: hearth_vmm::Accel,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

/// Descriptors open in this process (the daemon runs in it).
fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Bytes under `p` (allocated blocks, so sparse files count as they cost).
fn disk(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += disk(&e.path()),
            Ok(m) => total += m.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}

fn rss_kib() -> u64 {
    report::proc_kib(std::process::id(), "status", "VmRSS:").unwrap_or(0)
}

async fn exec(c: &Client, id: &str, shell: &str) -> anyhow::Result<Value> {
    let out = c.call(http::Method::POST, &format!("/hearth/v1/microvms/{id}/exec"), Some(&json!({ "shell": shell }))).await?;
    anyhow::ensure!(out["exitCode"] == 0, "exec {shell:?} in {id} answered {out}");
    Ok(out)
}

async fn run_one(c: &Client) -> anyhow::Result<String> {
    let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
    anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
    Ok(m["microvmId"].as_str().unwrap_or_default().to_owned())
}

/// Runs the soak.
pub async fn run(a: SoakArgs) -> anyhow::Result<()> {
    let d = crate::daemon::BenchDaemon::start(a.accel, "bench-soak-").await?;
    let c = d.client.clone();
    let mut rows = Vec::new();

    eprintln!("suspend/resume ×{}", a.cycles);
    let id = run_one(&c).await?;
    let pid = exec(&c, &id, "sh -c 'while true; do sleep 1; done' >/dev/null 2>&1 & echo $!").await?["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .to_owned();
    anyhow::ensure!(pid.parse::<u32>().is_ok(), "no background process started: {pid:?}");
    let (mut suspend, mut resume) = (Vec::new(), Vec::new());
    for i in 0..a.cycles {
        exec(&c, &id, &format!("echo {i} >> /root/cycles")).await?;
        let t = Instant::now();
        c.call(http::Method::POST, &format!("/2025-09-09/microvms/{id}/suspend"), None).await?;
        suspend.push(ms(t.elapsed()));
        let t = Instant::now();
        c.call(http::Method::POST, &format!("/2025-09-09/microvms/{id}/resume"), None).await?;
        resume.push(ms(t.elapsed()));
        let out = exec(&c, &id, &format!("test -d /proc/{pid} && wc -l < /root/cycles")).await?;
        let lines: usize = out["stdout"].as_str().unwrap_or("").trim().parse().unwrap_or(0);
        anyhow::ensure!(lines == i + 1, "cycle {i}: the file has {lines} lines, not {}", i + 1);
    }
    c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
    rows.push(Row { name: "SuspendMicrovm (API), process and file kept".into(), samples: suspend, unit: "ms" });
    rows.push(Row { name: "ResumeMicrovm (API), process and file kept".into(), samples: resume, unit: "ms" });

    eprintln!("run → exec → terminate ×{}", a.runs);
    // Warm-up: the first launch maps the image and grows pools that then stay.
    let id = run_one(&c).await?;
    exec(&c, &id, "true").await?;
    c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
    let sample = || (fds(), rss_kib(), disk(d.state.path()));
    let before = sample();
    let mut halfway = before;
    let mut cycle = Vec::new();
    for i in 0..a.runs {
        let t = Instant::now();
        let id = run_one(&c).await?;
        exec(&c, &id, "echo hi > /root/x && cat /root/x").await?;
        c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
        cycle.push(ms(t.elapsed()));
        if i + 1 == a.runs / 2 {
            halfway = sample();
        }
    }
    let after = sample();
    rows.push(Row { name: "run → exec → terminate cycle (API)".into(), samples: cycle, unit: "ms" });
    // One row per sample point (a table row sorts its samples).
    for (when, (f, r, b)) in [("before", before), ("halfway through", halfway), ("after", after)] {
        rows.push(Row { name: format!("open descriptors, {when} the cycles"), samples: vec![f as f64], unit: "fds" });
        rows.push(Row { name: format!("daemon RSS, {when} the cycles"), samples: vec![r as f64 / 1024.0], unit: "MiB" });
        rows.push(Row { name: format!("state directory, {when} the cycles"), samples: vec![b as f64 / 1e6], unit: "MB" });
    }

    eprintln!("RunMicrovm ×{} at once, GetMicrovm meanwhile", a.concurrent);
    let probe = run_one(&c).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let getter = {
        let (c, stop, probe) = (c.clone(), stop.clone(), probe.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                if c.call(http::Method::GET, &format!("/2025-09-09/microvms/{probe}"), None).await.is_ok() {
                    lat.push(ms(t.elapsed()));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            lat
        })
    };
    let t = Instant::now();
    let launches: Vec<_> = (0..a.concurrent)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                run_one(&c).await.map(|id| (id, ms(t.elapsed())))
            })
        })
        .collect();
    let mut ids = vec![probe];
    let mut launch = Vec::new();
    let mut failed = Vec::new();
    for l in launches {
        match l.await? {
            Ok((id, took)) => {
                ids.push(id);
                launch.push(took);
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    let all = ms(t.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gets = getter.await?;
    for id in &ids {
        let _ = c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await;
    }
    anyhow::ensure!(failed.is_empty(), "{} of {} concurrent launches failed: {}", failed.len(), a.concurrent, failed.join("; "));
    rows.push(Row { name: format!("RunMicrovm → RUNNING, {} at once", a.concurrent), samples: launch, unit: "ms" });
    rows.push(Row { name: format!("all {} launches", a.concurrent), samples: vec![all], unit: "ms" });
    rows.push(Row { name: "GetMicrovm during the launches".into(), samples: gets, unit: "ms" });
    d.stop().await;
    report::print(rows, a.json, json!({ "accel": hearth_vmm::accel::resolve(a.accel).to_string() }));

    if a.check {
        // Bounds, not timings: a descriptor or a file per cycle would show as growth
        // proportional to the cycles; a little slack covers pooled connections and the log.
        let fd_growth = after.0.saturating_sub(before.0);
        let disk_growth = after.2.saturating_sub(before.2);
        let rss_growth = after.1.saturating_sub(before.1);
        anyhow::ensure!(fd_growth <= 16, "open descriptors grew by {fd_growth} over {} cycles", a.runs);
        anyhow::ensure!(disk_growth <= 64 << 20, "the state directory grew by {disk_growth} bytes over {} cycles", a.runs);
        anyhow::ensure!(rss_growth <= 64 << 10, "RSS grew by {} MiB over {} cycles", rss_growth / 1024, a.runs);
        eprintln!("soak check: descriptors +{fd_growth}, disk +{disk_growth} B, RSS +{} KiB: within bounds", rss_growth);
    }
    Ok(())
}
