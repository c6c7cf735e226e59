//! `hearth-bench api`: the control plane measured through its HTTP API, in one run:
//! RunMicrovm → RUNNING and → first exec result (via the exec extension), from the warm
//! pool and with the pool disabled, against a cold boot of the same root filesystem; the endpoint (through the proxy vs inside the VM, the
//! first request to a suspended microvm); SuspendMicrovm and ResumeMicrovm with pages
//! dirtied and of a large session (`api_snap`); shells (open → first output, keystroke echo);
//! ListMicrovms latency with 1,000 microvms in the store; file transfers both ways against
//! the engine's agent (`api_files`).
//!
//! A daemon is started in this process on a loopback port with a scratch state directory;
//! the image is a busybox httpd app built through CreateMicrovmImage.

use crate::api_load::Goal;
use crate::report::{self, ms, Row};
use clap::Args;
use hearth_api::client::Client;
use serde_json::json;
use std::time::{Duration, Instant};

/// Options of `hearth-bench api`.
#[derive(Args, Debug)]
pub struct BenchApiArgs {
    /// Microvms launched (sequentially).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Microvm records in the store for the ListMicrovms measurement.
    #[arg(long, default_value_t = 1000)]
    records: usize,
    /// Requests through the ingress endpoint.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// ListMicrovms calls measured.
    #[arg(long, default_value_t = 100)]
    lists: usize,
    /// Clients of the sustained RunMicrovm → exec → TerminateMicrovm run.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds of the sustained runs, the engine's baseline and the API's (0 skips both).
    #[arg(long, default_value_t = 20)]
    sustain_secs: u64,
    /// Concurrent RunMicrovm during which GetMicrovm is timed (0 skips it).
    #[arg(long, default_value_t = 30)]
    storm: usize,
    /// Idle microvms whose host PSS and CPU are measured (0 skips it; fewer when the
    /// host's available memory would not hold them).
    #[arg(long, default_value_t = 50)]
    idle: usize,
    /// SuspendMicrovm / ResumeMicrovm cycles of each suspend case (0 skips them).
    #[arg(long, default_value_t = 3)]
    cycles: usize,
    /// MiB the guest writes between a resume and the next suspend.
    #[arg(long, default_value_t = 200)]
    dirty_mib: usize,
    /// Guest memory of the large-session case (0 skips it).
    #[arg(long, default_value_t = 4096)]
    big_memory_mib: u32,
    /// What the large session's app holds in memory, in MiB.
    #[arg(long, default_value_t = 2048)]
    big_state_mib: usize,
    /// Accelerator.
    #[arg(long, default_value = "auto", env = "HEARTH_ACCEL")]
    accel: hearth_vmm::Accel,
    /// Sizes (MiB) of the files item: uploads and downloads through the API against the
    /// engine's agent (empty skips it).
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    files_mib: Vec<usize>,
    /// Only the files item.
    #[arg(long)]
    only_files: bool,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark.
pub async fn run(a: BenchApiArgs) -> anyhow::Result<()> {
    let d = crate::daemon::BenchDaemon::start(a.accel, "bench-api-").await?;
    if a.only_files {
        let rows = crate::api_files::files(&d, &a.files_mib).await?;
        d.stop().await;
        report::print(rows, a.json, json!({ "accel": hearth_vmm::accel::resolve(a.accel).to_string() }));
        return Ok(());
    }
    let (c, addr, home, vm) = (d.client.clone(), d.addr, d.home.clone(), d.vm.clone());

    let mut cold = Vec::new();
    let (mut running, mut first_exec, mut pooled_running, mut pooled_exec) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for pooled in [false, true] {
        d.set_pool_size(usize::from(pooled)).await?;
        eprintln!("RunMicrovm ×{} ({})", a.runs, if pooled { "from the warm pool" } else { "pool disabled" });
        for _ in 0..a.runs {
            if pooled {
                // Measured from a pool that has refilled: what a run finds on a host whose
                // pool keeps up with its rate.
                d.pool_ready(1).await?;
            } else {
                // The pool retires at the daemon's next policy pass.
                tokio::time::sleep(Duration::from_millis(if running.is_empty() { 1500 } else { 100 })).await;
            }
            let t = Instant::now();
            let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
            anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
            let r = ms(t.elapsed());
            let id = m["microvmId"].as_str().unwrap_or_default().to_owned();
            let out = c.call(http::Method::POST, &format!("/hearth/v1/microvms/{id}/exec"), Some(&json!({ "command": ["true"] }))).await?;
            anyhow::ensure!(out["exitCode"] == 0, "exec answered {out}");
            let e = ms(t.elapsed());
            if pooled {
                pooled_running.push(r);
                pooled_exec.push(e);
            } else {
                running.push(r);
                first_exec.push(e);
            }
            c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
        }
    }
    d.set_pool_size(0).await?;
    eprintln!("engine: launch from a template → first exec ×{} (baseline)", a.runs);
    let engine = crate::api_snap::engine_launches(&d, a.runs).await?;
    let p50 = crate::api_snap::p50;
    let mut goals = vec![
        Goal {
            what: "RunMicrovm → first exec p50, from the warm pool".into(),
            value: p50(&pooled_exec),
            goal: 60.0,
            lower_is_better: true,
            unit: "ms",
        },
        Goal {
            what: "RunMicrovm → first exec p50, pool disabled, vs the engine's unpooled launch + 20 ms in this run".into(),
            value: p50(&first_exec),
            goal: ((p50(&engine) + 20.0) * 10.0).round() / 10.0,
            lower_is_better: true,
            unit: "ms",
        },
    ];
    let snap = crate::api_snap::run(
        &d,
        &crate::api_snap::SnapOptions {
            cycles: a.cycles,
            dirty_mib: a.dirty_mib,
            big_memory_mib: a.big_memory_mib,
            big_state_mib: a.big_state_mib,
        },
        p50(&first_exec),
    )
    .await?;
    goals.extend(snap.goals);
    let load = crate::api_load::run(
        &d,
        &crate::api_load::LoadOptions { clients: a.clients, sustain_secs: a.sustain_secs, storm: a.storm, idle: a.idle },
    )
    .await?;
    eprintln!("ingress: {} requests through the endpoint and from inside the VM", a.requests);
    let m = c
        .call(
            http::Method::POST,
            "/2025-09-09/microvms",
            Some(&json!({ "imageIdentifier": "bench", "ingressNetworkConnectors": ["SHELL_INGRESS"], "idlePolicy": { "maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600, "autoResumeEnabled": true } })),
        )
        .await?;
    let id = m["microvmId"].as_str().unwrap_or_default().to_owned();
    // The path form: the benchmark's daemon serves no TLS endpoint listener.
    let url = format!("http://{}/microvms/{id}/ready", d.addr);
    let tok = c
        .call(
            http::Method::POST,
            &format!("/2025-09-09/microvms/{id}/auth-token"),
            Some(&json!({ "expirationInMinutes": 10, "allowedPorts": [{ "port": 8080 }] })),
        )
        .await?["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let web = reqwest::Client::new();
    let get = |web: reqwest::Client, url: String, tok: String| async move {
        let r = web.get(&url).header("X-aws-proxy-auth", tok).send().await?;
        anyhow::ensure!(r.status() == 200, "endpoint answered {}", r.status());
        r.bytes().await?;
        Ok::<_, anyhow::Error>(())
    };
    get(web.clone(), url.clone(), tok.clone()).await?;
    let mut through = Vec::new();
    for _ in 0..a.requests {
        let t = Instant::now();
        get(web.clone(), url.clone(), tok.clone()).await?;
        through.push(ms(t.elapsed()));
    }
    let t = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (web, url, tok, n) = (web.clone(), url.clone(), tok.clone(), a.requests / 8);
            tokio::spawn(async move {
                for _ in 0..n {
                    get(web.clone(), url.clone(), tok.clone()).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let rps = (a.requests / 8 * 8) as f64 / t.elapsed().as_secs_f64();
    let inside_cmd =
        format!("i=0; while [ $i -lt {} ]; do busybox wget -q -O- http://127.0.0.1:8080/ready >/dev/null; i=$((i+1)); done", a.requests);
    let t = Instant::now();
    c.call(http::Method::POST, &format!("/hearth/v1/microvms/{id}/exec"), Some(&json!({ "shell": inside_cmd }))).await?;
    let inside = ms(t.elapsed()) / a.requests as f64;
    let mut resume_first = Vec::new();
    for _ in 0..3 {
        c.call(http::Method::POST, &format!("/2025-09-09/microvms/{id}/suspend"), None).await?;
        let t = Instant::now();
        get(web.clone(), url.clone(), tok.clone()).await?;
        resume_first.push(ms(t.elapsed()));
    }
    eprintln!("shells: open → first output, keystroke echo");
    let (shell_open, keystroke) = bench_shell(&c, &addr.to_string(), &id).await?;
    c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;

    eprintln!("cold boots ×{} (baseline)", a.runs.min(5));
    for _ in 0..a.runs.min(5) {
        let mut cfg = vm.clone();
        cfg.root = Some(hearth_vmm::Disk::base(hearth_image::base::Base::Busybox.path(&home), hearth_vmm::DiskFormat::Raw));
        let t = Instant::now();
        let v = hearth_vmm::Vm::boot(cfg).await?;
        v.exec(&hearth_proto::exec::ExecRequest::argv(["true"]), None, 1 << 16).await?;
        cold.push(ms(t.elapsed()));
        v.shutdown().await;
    }

    eprintln!("ListMicrovms with {} microvms in the store", a.records);
    {
        let store = hearth_api::store::Store::open(&d.state.path().join("hearth.db"))?;
        let t = hearth_api::clock::now();
        for i in 0..a.records {
            store.put_microvm(&hearth_api::store::MicrovmRecord {
                microvm_id: format!("mvm-bench{i:08}"),
                account: d.account.clone(),
                image_name: "bench".into(),
                image_version: 1,
                state: hearth_api::lifecycle::MicrovmState::Terminated,
                state_reason: Some("benchmark record".into()),
                spec: json!({}),
                started_at: t,
                terminated_at: Some(t),
                last_activity: t,
                suspended_at: None,
                maximum_duration_in_seconds: 60,
                memory_mib: 512,
                vcpus: 1,
                vm_dir: None,
            })?;
        }
    }
    let mut page = Vec::new();
    for _ in 0..a.lists {
        let t = Instant::now();
        c.call(http::Method::GET, "/2025-09-09/microvms?maxResults=50", None).await?;
        page.push(ms(t.elapsed()));
    }
    let mut all = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut token: Option<String> = None;
        let mut n = 0;
        loop {
            let q = token.as_ref().map_or_else(String::new, |t| format!("&nextToken={t}"));
            let v = c.call(http::Method::GET, &format!("/2025-09-09/microvms?maxResults=50{q}"), None).await?;
            n += v["items"].as_array().map_or(0, Vec::len);
            match v["nextToken"].as_str() {
                Some(t) => token = Some(t.to_owned()),
                None => break,
            }
        }
        anyhow::ensure!(n >= a.records, "listed {n} of {} microvms", a.records);
        all.push(ms(t.elapsed()));
    }
    let files = crate::api_files::files(&d, &a.files_mib).await?;
    d.stop().await;
    goals.extend(load.goals);
    let goals: Vec<String> = goals.iter().map(Goal::line).collect();
    let mut rows = vec![
        Row { name: "RunMicrovm → RUNNING, from the warm pool (API, minimal image)".into(), samples: pooled_running, unit: "ms" },
        Row { name: "RunMicrovm → first exec result, from the warm pool (API)".into(), samples: pooled_exec, unit: "ms" },
        Row { name: "RunMicrovm → RUNNING, pool disabled (API)".into(), samples: running, unit: "ms" },
        Row { name: "RunMicrovm → first exec result, pool disabled (API)".into(), samples: first_exec, unit: "ms" },
        Row { name: "baseline: engine launch from a template → first exec (unpooled)".into(), samples: engine, unit: "ms" },
        Row { name: "baseline: cold boot → first exec (busybox)".into(), samples: cold, unit: "ms" },
        Row { name: "GET through the endpoint (token, tunnel, app), sequential".into(), samples: through, unit: "ms" },
        Row { name: "GET through the endpoint, 8 concurrent clients".into(), samples: vec![rps], unit: "req/s" },
        Row { name: "GET from inside the VM (busybox wget, per request)".into(), samples: vec![inside], unit: "ms" },
        Row { name: "first GET to a SUSPENDED microvm (auto-resume)".into(), samples: resume_first, unit: "ms" },
        Row { name: "shell: token + WebSocket → first terminal output".into(), samples: shell_open, unit: "ms" },
        Row { name: "shell: keystroke → its echo (WebSocket, agent, PTY)".into(), samples: keystroke, unit: "ms" },
        Row { name: format!("ListMicrovms, one page of 50, {} in the store", a.records), samples: page, unit: "ms" },
        Row { name: format!("ListMicrovms, all {} pages of 50", a.records.div_ceil(50)), samples: all, unit: "ms" },
    ];
    rows.extend(snap.rows);
    rows.extend(load.rows);
    rows.extend(files);
    report::print(rows, a.json, json!({ "accel": hearth_vmm::accel::resolve(a.accel).to_string(), "goals": goals }));
    if !a.json && !goals.is_empty() {
        println!("\nGoals (issue 16):\n{}", goals.join("\n"));
    }
    Ok(())
}

/// Waits for a binary message of a shell (containing `want`, if given).
async fn shell_output<S>(ws: &mut S, want: Option<u8>) -> anyhow::Result<()>
where
    S: futures_util::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if want.is_none_or(|w| b.contains(&w)) => return Ok(()),
            Some(Ok(_)) => {}
            other => anyhow::bail!("the shell ended early: {other:?}"),
        }
    }
}

/// Opens shells into microvm `id`: time to the first terminal output (5 times), and
/// keystroke-to-echo round trips (50) in the first.
async fn bench_shell(c: &Client, addr: &str, id: &str) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let (mut open, mut keys) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let t = Instant::now();
        let v = c
            .call(http::Method::POST, &format!("/2025-09-09/microvms/{id}/shell-auth-token"), Some(&json!({ "expirationInMinutes": 5 })))
            .await?;
        let mut req = format!("ws://{addr}/shell/{id}").into_client_request()?;
        req.headers_mut().insert("x-aws-proxy-auth", v["authToken"]["X-aws-proxy-auth"].as_str().unwrap_or_default().parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        shell_output(&mut ws, None).await?;
        open.push(ms(t.elapsed()));
        if i == 0 {
            // Let the banner and prompt go by.
            while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await {}
            for _ in 0..50 {
                let t = Instant::now();
                ws.send(Message::Binary(b"Z".to_vec().into())).await?;
                shell_output(&mut ws, Some(b'Z')).await?;
                keys.push(ms(t.elapsed()));
            }
        }
        ws.close(None).await?;
    }
    Ok((open, keys))
}
