//! The launch and suspend/resume half of `hearth-bench api` (issue 16, items 1 and 2), all
//! through the API and each against a baseline taken in the same run: the engine's own
//! unpooled launch → first exec from a template of the same root filesystem;
//! SuspendMicrovm and ResumeMicrovm → first exec of a microvm with `--dirty-mib` written
//! since its launch (against the engine's suspend and resume of the same); and the large session, an image of `--big-memory-mib` whose app holds
//! `--big-state-mib` in its template, run, suspended right after launch and resumed.

use crate::api_load::Goal;
use crate::daemon::BenchDaemon;
use crate::report::{ms, pct, Row};
use hearth_api::client::Client;
use serde_json::json;
use std::time::Instant;

/// What the suspend/resume half measured.
pub struct Snap {
    /// Table rows.
    pub rows: Vec<Row>,
    /// Goals checked.
    pub goals: Vec<Goal>,
}

/// The engine's unpooled launch → first exec, `n` times in a row (the baseline the API's
/// launch is compared with).
pub async fn engine_launches(d: &BenchDaemon, n: usize) -> anyhow::Result<Vec<f64>> {
    let snap = crate::api_load::engine_template(d).await?;
    let opts = hearth_vmm::RestoreOptions { run_root: d.vm.run_root.clone(), ..hearth_vmm::RestoreOptions::new() };
    let mut out = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let vm = hearth_vmm::Vm::launch(&snap, &opts).await?;
        vm.exec(&hearth_proto::exec::ExecRequest::argv(["true"]), None, 1 << 16).await?;
        out.push(ms(t.elapsed()));
        vm.kill().await;
    }
    Ok(out)
}

/// p50 of `v`.
pub fn p50(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    pct(&s, 0.5)
}

async fn exec(c: &Client, id: &str, shell: &str) -> anyhow::Result<()> {
    let out = c.call(http::Method::POST, &format!("/hearth/v1/microvms/{id}/exec"), Some(&json!({ "shell": shell }))).await?;
    anyhow::ensure!(out["exitCode"] == 0, "exec of {shell:?} answered {out}");
    Ok(())
}

/// Per cycle: SuspendMicrovm's duration and ResumeMicrovm → first exec result.
struct Cycles {
    suspend: Vec<f64>,
    resume_exec: Vec<f64>,
}

/// Runs a microvm of `image`, then `cycles` times writes `dirty_mib` MiB of new bytes into
/// its tmpfs, suspends and resumes it through the API. Returns the cycles and the run's
/// RunMicrovm → first exec result.
async fn cycles(c: &Client, image: &str, cycles: usize, dirty_mib: usize) -> anyhow::Result<(Cycles, f64)> {
    let t = Instant::now();
    let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": image }))).await?;
    anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
    let id = m["microvmId"].as_str().unwrap_or_default().to_owned();
    exec(c, &id, "true").await?;
    let launch = ms(t.elapsed());
    let mut out = Cycles { suspend: Vec::new(), resume_exec: Vec::new() };
    for _ in 0..cycles {
        if dirty_mib > 0 {
            exec(c, &id, &format!("rm -f /dev/shm/dirty; head -c {} /dev/urandom > /dev/shm/dirty", dirty_mib << 20)).await?;
        }
        let t = Instant::now();
        c.call(http::Method::POST, &format!("/2025-09-09/microvms/{id}/suspend"), None).await?;
        out.suspend.push(ms(t.elapsed()));
        let t = Instant::now();
        c.call(http::Method::POST, &format!("/2025-09-09/microvms/{id}/resume"), None).await?;
        exec(c, &id, "true").await?;
        out.resume_exec.push(ms(t.elapsed()));
    }
    c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
    Ok((out, launch))
}

/// Builds image `big`: `memory_mib` of guest memory, an app holding `state_mib` in its
/// tmpfs before it listens (so the template holds it), no warm pool.
async fn build_big(d: &BenchDaemon, memory_mib: u32, state_mib: usize) -> anyhow::Result<()> {
    let ctx = d.state.path().join("ctx-big");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            // 64 MiB of random bytes, repeated: few processes and large writes (a `yes`
            // pipe takes minutes under TCG), and no page is zero or the same as another.
            "FROM minimal\nRUN mkdir -p /www && echo ok > /www/ready\n\
             CMD head -c 67108864 /dev/urandom > /tmp/chunk && i=0 && while [ $i -lt {} ]; do cat /tmp/chunk; i=$((i+1)); done > /dev/shm/state \
             && rm /tmp/chunk && exec busybox httpd -f -p 8080 -h /www\n",
            state_mib.div_ceil(64)
        ),
    )?;
    d.client
        .call(
            http::Method::POST,
            "/2025-09-09/microvm-images",
            Some(&json!({
                "name": "big",
                "baseImageArn": hearth_api::service::managed_arn("minimal"),
                "buildRoleArn": "arn:aws:iam::123456789012:role/bench",
                "codeArtifact": { "uri": format!("file://{}", ctx.display()) },
                "resources": [{ "minimumMemoryInMiB": memory_mib }],
                // Filling the memory takes a while under emulation.
                "hooks": { "microvmImageHooks": { "readyTimeoutInSeconds": 1800 } },
                "tags": { hearth_api::service::POOL_SIZE_TAG: "0" },
            })),
        )
        .await?;
    d.wait_built("big").await
}

/// Options of the suspend/resume half.
pub struct SnapOptions {
    /// Suspend/resume cycles of each case.
    pub cycles: usize,
    /// MiB written between a resume and the next suspend.
    pub dirty_mib: usize,
    /// Guest memory of the large session (0 skips it).
    pub big_memory_mib: u32,
    /// What its app holds.
    pub big_state_mib: usize,
}

/// Runs the suspend/resume measurements; `launch_p50` is the API's unpooled RunMicrovm →
/// first exec p50 of the same run (the resume's goal).
pub async fn run(d: &BenchDaemon, o: &SnapOptions, launch_p50: f64) -> anyhow::Result<Snap> {
    let (mut rows, mut goals) = (Vec::new(), Vec::new());
    if o.cycles == 0 {
        return Ok(Snap { rows, goals });
    }
    let what = format!("512 MiB, {} MiB dirtied", o.dirty_mib);
    eprintln!("engine: suspend / resume ×{} ({what}, baseline)", o.cycles);
    let snap = crate::api_load::engine_template(d).await?;
    let opts = hearth_vmm::RestoreOptions { run_root: d.vm.run_root.clone(), ..hearth_vmm::RestoreOptions::new() };
    let engine = crate::snapshots::suspend_cycles(&snap, &opts, &d.state.path().join("engine-suspended"), o.cycles, o.dirty_mib).await?;
    eprintln!("SuspendMicrovm / ResumeMicrovm ×{} ({what})", o.cycles);
    let (dirty, _) = cycles(&d.client, "bench", o.cycles, o.dirty_mib).await?;
    goals.push(Goal {
        what: format!("SuspendMicrovm p50 ({what})"),
        value: p50(&dirty.suspend),
        goal: 250.0,
        lower_is_better: true,
        unit: "ms",
    });
    goals.push(Goal {
        what: format!("ResumeMicrovm → first exec p50 ({what}) vs this run's unpooled RunMicrovm → first exec"),
        value: p50(&dirty.resume_exec),
        goal: (launch_p50 * 10.0).round() / 10.0,
        lower_is_better: true,
        unit: "ms",
    });
    goals.push(Goal {
        what: format!("ResumeMicrovm → first exec p50 ({what}), stretch"),
        value: p50(&dirty.resume_exec),
        goal: 150.0,
        lower_is_better: true,
        unit: "ms",
    });
    rows.push(Row { name: format!("baseline: engine suspend ({what})"), samples: engine.suspend, unit: "ms" });
    rows.push(Row { name: format!("baseline: engine resume → first exec result ({what})"), samples: engine.resumed_exec, unit: "ms" });
    rows.push(Row { name: format!("SuspendMicrovm ({what}, API)"), samples: dirty.suspend, unit: "ms" });
    rows.push(Row { name: format!("ResumeMicrovm → first exec result ({what}, API)"), samples: dirty.resume_exec, unit: "ms" });
    if o.big_memory_mib > 0 {
        let what = format!("{} MiB, app holding {} MiB, nothing dirtied", o.big_memory_mib, o.big_state_mib);
        eprintln!("large session: building the image ({what})");
        build_big(d, o.big_memory_mib, o.big_state_mib).await?;
        eprintln!("large session: RunMicrovm, then SuspendMicrovm / ResumeMicrovm ×{}", o.cycles.min(2));
        let (big, launch) = cycles(&d.client, "big", o.cycles.min(2), 0).await?;
        goals.push(Goal {
            what: format!("SuspendMicrovm p50 ({what})"),
            value: p50(&big.suspend),
            goal: 1000.0,
            lower_is_better: true,
            unit: "ms",
        });
        goals.push(Goal {
            what: format!("ResumeMicrovm → first exec p50 ({what})"),
            value: p50(&big.resume_exec),
            goal: 1000.0,
            lower_is_better: true,
            unit: "ms",
        });
        rows.push(Row { name: format!("RunMicrovm → first exec result ({what}, API)"), samples: vec![launch], unit: "ms" });
        rows.push(Row { name: format!("SuspendMicrovm ({what}, API)"), samples: big.suspend, unit: "ms" });
        rows.push(Row { name: format!("ResumeMicrovm → first exec result ({what}, API)"), samples: big.resume_exec, unit: "ms" });
    }
    Ok(Snap { rows, goals })
}
