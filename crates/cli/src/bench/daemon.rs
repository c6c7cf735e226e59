//! A `hearth serve` daemon inside the benchmark's own process, for the API benchmarks: a
//! loopback port, a scratch state directory under `$HEARTH_HOME`, one tenant allowed to
//! build from that directory, and a minimal busybox httpd image built through the API.

use hearth_api::client::Client;
use serde_json::json;
use std::time::Duration;

/// Kills whatever microvm QEMU of the benchmark is left (they are detached, and outlive
/// an in-process daemon that stops on an error) and their network namespaces: only those
/// whose run directory is the benchmark's own.
pub struct Leftovers(pub std::path::PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill").arg("-9").arg("-f").arg(format!("{}/", self.0.display())).status();
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del"])
                .arg(format!("hearth-{}", e.file_name().to_string_lossy()))
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The running daemon and a client of its tenant. Fields drop in order: the leftovers are
/// killed before the state directory goes.
pub struct BenchDaemon {
    /// A client signing as the tenant.
    pub client: Client,
    /// The daemon's address.
    pub addr: std::net::SocketAddr,
    /// The tenant's account.
    pub account: String,
    /// The VM settings the daemon uses (for baselines booted beside it).
    pub vm: hearth_vmm::VmConfig,
    /// `$HEARTH_HOME`.
    pub home: std::path::PathBuf,
    /// Its metrics listener.
    pub metrics: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
    _leftovers: Leftovers,
    /// The scratch state directory.
    pub state: tempfile::TempDir,
}

impl BenchDaemon {
    /// Starts the daemon and builds the image `bench` (busybox httpd on port 8080).
    pub async fn start(accel: hearth_vmm::Accel, prefix: &str) -> anyhow::Result<BenchDaemon> {
        let home = hearth_vmm::home::hearth_home();
        let (kernel, initramfs) = hearth_vmm::assets::boot_files(&home)?;
        let mut vm = hearth_vmm::VmConfig::new(kernel, initramfs);
        vm.accel = accel;
        let state = tempfile::Builder::new().prefix(prefix).tempdir_in(&home)?;
        vm.run_root = state.path().join("run");
        let leftovers = Leftovers(vm.run_root.clone());
        let store = hearth_api::store::Store::open(&state.path().join("hearth.db"))?;
        let key = hearth_api::keys::new_key(&hearth_api::keys::new_account());
        store.add_key(&key)?;
        // The benchmark's tenant builds from a directory of its own state, as an operator
        // would allow with `hearth accounts set --artifact-root`.
        store.set_account_settings(
            &key.account,
            &hearth_api::store::AccountSettings { artifact_root: Some(state.path().to_path_buf()), ..Default::default() },
        )?;
        drop(store);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cfg = hearth_api::server::ServeConfig {
            listen: "127.0.0.1:0".parse()?,
            home: home.clone(),
            state_dir: state.path().to_path_buf(),
            vm: vm.clone(),
            policy_interval: Duration::from_secs(1),
            public_url: None,
            endpoints: Default::default(),
            metrics_listen: Some("127.0.0.1:0".parse()?),
            egress_allow_private: Vec::new(),
            // Sized for the benchmark's idle measurement (50 microvms of 512 MiB and one
            // vCPU on a small host): clones share their template's pages (PSS ~35 MiB
            // each, measured), so the default bet of no memory overcommit would refuse
            // most of them. `api_load::idle_capacity` checks what the host really holds.
            capacity: hearth_api::capacity::Settings { memory_overcommit: 4.0, cpu_overcommit: 64.0, ..Default::default() },
            rate_limit: Default::default(),
            pools: Default::default(),
            default_egress: Default::default(),
            default_arch: hearth_vmm::Arch::host(),
            mcp: None,
            max_concurrent_builds: hearth_api::service::default_max_concurrent_builds(),
        };
        let task = tokio::spawn(hearth_api::server::serve(
            cfg,
            move |s| {
                let _ = tx.send((s.addr, s.metrics_addr));
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let (addr, metrics) = rx.await?;
        let metrics = metrics.ok_or_else(|| anyhow::anyhow!("the daemon serves no metrics"))?;
        let client = Client::new(&format!("http://{addr}"), &key.access_key, &key.secret);
        let d = BenchDaemon {
            client,
            addr,
            account: key.account,
            vm,
            home,
            metrics,
            stop: Some(stop_tx),
            task: Some(task),
            _leftovers: leftovers,
            state,
        };
        d.build_image().await?;
        Ok(d)
    }

    async fn build_image(&self) -> anyhow::Result<()> {
        let ctx = self.state.path().join("ctx");
        std::fs::create_dir_all(&ctx)?;
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM minimal\nRUN mkdir -p /www && echo ok > /www/ready\nCMD busybox httpd -f -p 8080 -h /www\n",
        )?;
        eprintln!("building the image through the API");
        self.client
            .call(
                http::Method::POST,
                "/2025-09-09/microvm-images",
                Some(&json!({
                    "name": "bench",
                    "baseImageArn": hearth_api::service::managed_arn("minimal"),
                    "buildRoleArn": "arn:aws:iam::123456789012:role/bench",
                    "codeArtifact": { "uri": format!("file://{}", ctx.display()) },
                })),
            )
            .await?;
        self.wait_built("bench").await
    }

    /// Waits until version 1 of image `name` is built.
    pub async fn wait_built(&self, name: &str) -> anyhow::Result<()> {
        loop {
            let v = self.client.call(http::Method::GET, &format!("/2025-09-09/microvm-images/{name}/versions/1"), None).await?;
            match v["state"].as_str() {
                Some("SUCCESSFUL") => return Ok(()),
                Some("FAILED") => anyhow::bail!("the image build failed: {}", v["stateReason"]),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Sets image `bench`'s warm pool size (its `hearth:pool-size` tag). A version's pool
    /// is created by a run of it, so a size above 0 is followed by one run (terminated at
    /// once) for the pool to start filling.
    pub async fn set_pool_size(&self, n: usize) -> anyhow::Result<()> {
        let arn = hearth_api::service::image_arn(&self.account, "bench");
        let path = format!("/2017-03-31/tags/{}", percent_encoding::utf8_percent_encode(&arn, percent_encoding::NON_ALPHANUMERIC));
        self.client
            .call(http::Method::POST, &path, Some(&json!({ "Tags": { hearth_api::service::POOL_SIZE_TAG: n.to_string() } })))
            .await?;
        if n > 0 {
            let m = self.client.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
            let id = m["microvmId"].as_str().unwrap_or_default();
            self.client.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
        }
        Ok(())
    }

    /// Waits until image `bench`'s pool holds `n` VMs ready (its /metrics says so).
    pub async fn pool_ready(&self, n: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let want = format!("image=\"bench\",version=\"1\"}} {n}");
        loop {
            let text = reqwest::get(format!("http://{}/metrics", self.metrics)).await?.text().await?;
            if text.lines().any(|l| l.starts_with("hearth_pool_ready{") && l.ends_with(&want)) {
                return Ok(());
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "the warm pool did not fill within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the daemon gracefully.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
