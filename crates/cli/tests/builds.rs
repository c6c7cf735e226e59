//! Builds bounded, end to end through `hearth serve` with real builder VMs: a step past
//! its timeout (an image tag) ends the build FAILED with its builder stopped; a flood of
//! output leaves a capped build.log; a delete cancels a running build and leaves nothing;
//! with `--max-concurrent-builds 1` a second build waits, and a queued one deleted leaves
//! the queue. A step that fills the root disk fails naming the tag that grows it, and a
//! bigger disk takes it, costing the host only what was written. Those builds are FROM
//! minimal (busybox): the fastest to boot. The python and nodejs bases are built on their
//! first use and run their runtimes' apps.

mod daemon;

use daemon::*;
use hearth_api::client::{Client, ClientError};
use http::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A test's daemon, its tenant and its directories.
struct Env {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    ctx: PathBuf,
    log: PathBuf,
    account: String,
    c: Client,
    _microvms: Microvms,
    daemon: Daemon,
}

impl Env {
    fn new(env: &[(&str, &str)]) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let k = key(&state);
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        allow_artifacts(&state, &k, &ctx);
        let log = tmp.path().join("daemon.log");
        let microvms = Microvms(state.clone());
        let mut all = vec![("RUST_LOG", "info")];
        all.extend_from_slice(env);
        let daemon = Daemon::start_with(&state, &all, &log);
        let kv: Value = serde_json::from_str(&k).unwrap();
        let c = Client::new(&daemon.1, kv["accessKeyId"].as_str().unwrap(), kv["secretAccessKey"].as_str().unwrap());
        let account = kv["account"].as_str().unwrap().to_owned();
        Env { _tmp: tmp, state, ctx, log, account, c, _microvms: microvms, daemon }
    }

    /// CreateMicrovmImage `name` on minimal from a context holding `dockerfile`, with `tags`.
    async fn create(&self, name: &str, dockerfile: &str, tags: Value) -> Result<Value, ClientError> {
        self.create_on("minimal", name, dockerfile, tags).await
    }

    /// CreateMicrovmImage `name` on the managed base `base`.
    async fn create_on(&self, base: &str, name: &str, dockerfile: &str, tags: Value) -> Result<Value, ClientError> {
        let dir = self.ctx.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        let mut body = json!({
            "name": name,
            "baseImageArn": hearth_api::service::managed_arn(base),
            "buildRoleArn": "arn:aws:iam::000000000000:role/hearth-test",
            "codeArtifact": { "uri": format!("file://{}", dir.display()) },
        });
        if !tags.is_null() {
            body["tags"] = tags;
        }
        self.c.call(Method::POST, "/2025-09-09/microvm-images", Some(&body)).await
    }

    async fn version(&self, name: &str) -> Value {
        self.c.call(Method::GET, &format!("/2025-09-09/microvm-images/{name}/versions/1"), None).await.unwrap()
    }

    /// GetMicrovmImageBuild of version 1 of `name` (its id from ListMicrovmImageBuilds).
    async fn build(&self, name: &str) -> Value {
        let list = self.c.call(Method::GET, &format!("/2025-09-09/microvm-images/{name}/versions/1/builds"), None).await.unwrap();
        let id = list["items"][0]["buildId"].as_str().unwrap_or_else(|| panic!("{list}"));
        self.c.call(Method::GET, &format!("/2025-09-09/microvm-images/{name}/versions/1/builds/{id}"), None).await.unwrap()
    }

    /// Waits for version 1 of `name` to end its build (SUCCESSFUL or FAILED).
    async fn ended(&self, name: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.version(name).await;
            if matches!(v["state"].as_str(), Some("SUCCESSFUL" | "FAILED")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} still {} after {within:?}:\n{}", v["state"], self.daemon_log());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn version_dir(&self, name: &str) -> PathBuf {
        self.state.join("images").join(&self.account).join(name).join("1")
    }

    /// Waits until `name`'s build log shows `what`.
    async fn log_shows(&self, name: &str, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let path = self.version_dir(name).join("build.log");
        while !std::fs::read_to_string(&path).unwrap_or_default().contains(what) {
            assert!(Instant::now() < deadline, "{name}'s build log never showed {what:?}:\n{}", self.daemon_log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn daemon_log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// QEMU processes of this test's daemon: (PID, command line).
    fn qemus(&self) -> Vec<(u32, String)> {
        let needle = format!("{}/", self.state.join("run").display());
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else { continue };
            if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                if c.contains("qemu") && c.contains(&needle) {
                    out.push((pid, c));
                }
            }
        }
        out
    }

    /// Waits until no QEMU of this daemon runs (the kill is sent before the build's end is
    /// recorded; the process may take a moment to be reaped).
    async fn no_qemu(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.qemus().is_empty() {
            assert!(Instant::now() < deadline, "QEMU left: {:#?}", self.qemus());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Run directories of this daemon's VMs.
    fn run_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.join("run")).into_iter().flatten().flatten().map(|e| e.path()).collect()
    }
}

fn scratch_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".ctx-") || name.contains(".staging-") {
            out.push(e.path());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(scratch_dirs(&e.path()));
        }
    }
    out
}

fn validation(r: Result<Value, ClientError>, tag: &str) {
    match r {
        Err(ClientError::Api { status: 400, code, message }) => {
            assert_eq!(code, "ValidationException", "{message}");
            assert!(message.contains(tag), "{message}");
        }
        other => panic!("expected a ValidationException naming {tag}, got {other:?}"),
    }
}

/// A RUN past the image's step timeout ends FAILED naming its line and the timeout, its
/// builder stopped; a flood of output leaves a capped build.log; bad timeout tags are
/// refused at CreateMicrovmImage and TagResource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_step_times_out_and_a_flood_leaves_a_capped_log() {
    let e = Env::new(&[]);
    let tag = hearth_api::service::TAG_STEP_TIMEOUT;
    validation(e.create("bad", "FROM minimal\n", json!({ tag: "soon" })).await, tag);
    validation(e.create("bad", "FROM minimal\n", json!({ hearth_api::service::TAG_BUILD_TIMEOUT: "0" })).await, "build-timeout-seconds");
    assert!(!e.state.join("images").join(&e.account).join("bad").exists());

    e.create("hang", "FROM minimal\nRUN echo started && sleep 1000\n", json!({ tag: "4" })).await.unwrap();
    e.create("flood", "FROM minimal\nRUN yes | head -c 10000000\n", Value::Null).await.unwrap();

    let v = e.ended("hang", Duration::from_secs(180)).await;
    assert_eq!(v["state"], "FAILED", "{v}");
    let why = v["stateReason"].as_str().unwrap();
    assert!(why.contains("line 2") && why.contains("timeout of 4 s") && why.contains(tag), "{why}");
    let log = std::fs::read_to_string(e.version_dir("hang").join("build.log")).unwrap();
    assert!(log.contains("  | started") && log.contains("build failed: Dockerfile line 2"), "{log}");
    let arn = hearth_api::service::image_arn(&e.account, "hang");
    let tags = |t: Value| json!({ "Tags": t });
    let path = format!("/2017-03-31/tags/{}", arn.replace(':', "%3A").replace('/', "%2F"));
    validation(e.c.call(Method::POST, &path, Some(&tags(json!({ tag: "86401" })))).await, tag);
    e.c.call(Method::POST, &path, Some(&tags(json!({ tag: "60" })))).await.unwrap();

    let v = e.ended("flood", Duration::from_secs(300)).await;
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");
    let log = std::fs::read_to_string(e.version_dir("flood").join("build.log")).unwrap();
    let cap = hearth_image::build::log::MAX_LOG_HEAD + hearth_image::build::log::MAX_LOG_TAIL + 4096;
    assert!(log.len() <= cap, "build.log is {} bytes", log.len());
    assert!(log.contains("[hearth: build log truncated: "), "no truncation line");
    assert!(log.ends_with("  | y\nsaving the template snapshot\nbuilt\n"), "{:?}", &log[log.len() - 300..]);

    e.no_qemu(Duration::from_secs(10)).await;
    assert!(e.run_dirs().is_empty(), "{:?}", e.run_dirs());
    assert!(scratch_dirs(&e.state).is_empty(), "{:?}", scratch_dirs(&e.state));
}

/// With `--max-concurrent-builds 1`: a second build stays PENDING (queued) while the first
/// runs; a queued build deleted leaves the queue; deleting the running one stops its
/// builder and leaves nothing, and the queued build then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cancels_a_running_build_and_builds_queue_past_the_bound() {
    let e = Env::new(&[("HEARTH_MAX_CONCURRENT_BUILDS", "1")]);
    e.create("first", "FROM minimal\nRUN echo started && sleep 1000\n", Value::Null).await.unwrap();
    e.log_shows("first", "  | started", Duration::from_secs(120)).await;
    let builders = e.qemus();
    assert_eq!(builders.len(), 1, "{builders:#?}");
    let (pid, cmdline) = builders[0].clone();
    let run_dir = e.run_dirs();
    assert_eq!(run_dir.len(), 1);
    assert!(cmdline.contains(run_dir[0].to_str().unwrap()), "{cmdline}");

    e.create("second", "FROM minimal\nRUN echo second > /second\n", Value::Null).await.unwrap();
    e.create("third", "FROM minimal\n", Value::Null).await.unwrap();
    for name in ["second", "third"] {
        let v = e.version(name).await;
        assert_eq!(v["state"], "PENDING", "{v}");
        let b = e.build(name).await;
        assert_eq!(b["buildState"], "PENDING", "{b}");
        assert!(b["stateReason"].as_str().unwrap_or_default().contains("queued"), "{b}");
    }
    // A queued build deleted leaves the queue (and the first is still the only builder).
    e.c.call(Method::DELETE, "/2025-09-09/microvm-images/third/versions/1", None).await.unwrap();
    assert!(!e.version_dir("third").exists());
    assert_eq!(e.version("first").await["state"], "IN_PROGRESS");

    // Deleting the running build's image stops its builder and leaves nothing of it.
    let t = Instant::now();
    e.c.call(Method::DELETE, "/2025-09-09/microvm-images/first", None).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "the delete took {:?}", t.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}/cmdline")).exists() && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    {
        assert!(Instant::now() < deadline, "the builder QEMU {pid} outlived the delete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!run_dir[0].exists(), "the builder's run directory {} is left", run_dir[0].display());
    assert!(!e.state.join("images").join(&e.account).join("first").exists());
    assert!(matches!(e.c.call(Method::GET, "/2025-09-09/microvm-images/first", None).await, Err(ClientError::Api { status: 404, .. })));

    // The queued build runs now, and ends.
    let v = e.ended("second", Duration::from_secs(180)).await;
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");
    e.no_qemu(Duration::from_secs(10)).await;
    assert!(e.run_dirs().is_empty(), "{:?}", e.run_dirs());
    assert!(scratch_dirs(&e.state).is_empty(), "{:?}", scratch_dirs(&e.state));
    drop(e.daemon);
}

/// The root disk: a step that fills it ends FAILED saying the disk is full and naming the
/// tag that grows it; with the tag, the disk is bigger (`df` in the builder), and the
/// image's disk on the host holds only what was written. A bad size is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_naming_the_tag_and_a_bigger_disk_takes_the_step() {
    let e = Env::new(&[]);
    let tag = hearth_image::disk::TAG_DISK_SIZE;
    validation(e.create("bad", "FROM minimal\n", json!({ tag: "4" })).await, tag);
    validation(e.create("bad", "FROM minimal\n", json!({ tag: "lots" })).await, tag);
    // fallocate allocates without writing: 12 GiB fills the 8 GiB default, not a 16 GiB disk.
    let step = "FROM minimal\nRUN fallocate -l 12G /big && df -k / && rm /big\n";
    e.create("full", step, Value::Null).await.unwrap();
    e.create("roomy", step, json!({ tag: "16" })).await.unwrap();

    let v = e.ended("full", Duration::from_secs(300)).await;
    assert_eq!(v["state"], "FAILED", "{v}");
    let why = v["stateReason"].as_str().unwrap();
    assert!(why.contains("line 2") && why.contains("root disk (8 GiB) is full") && why.contains(tag), "{why}");

    let v = e.ended("roomy", Duration::from_secs(300)).await;
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");
    let log = std::fs::read_to_string(e.version_dir("roomy").join("build.log")).unwrap();
    let total_kib: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("  | /dev/vda").and_then(|r| r.split_whitespace().next()).and_then(|k| k.parse().ok()))
        .unwrap_or_else(|| panic!("no df line in the log:\n{log}"));
    assert!(total_kib >= 15 << 20, "the 16 GiB disk's filesystem has {total_kib} KiB");
    let disk = e.version_dir("roomy").join("snapshot/disk.qcow2");
    let m = std::fs::metadata(&disk).unwrap();
    let on_host = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
    assert!(on_host < 256 << 20, "12 GiB allocated and removed in the guest took {on_host} bytes on the host");
    e.no_qemu(Duration::from_secs(10)).await;
}

/// The python and nodejs bases (built on their first use unless the set-up built them):
/// venv, pip, node and npm run in the builder, and each image's app (a Python and a
/// Node.js HTTP server) becomes ready in its microvm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_nodejs_bases_build_images_whose_apps_run() {
    let e = Env::new(&[]);
    e.create_on(
        "python",
        "py",
        // A venv without pip: seeding pip into it takes ~85 s under TCG.
        "FROM python:3.11\nRUN python3 -m venv --without-pip /opt/venv && python3 -m pip --version && /opt/venv/bin/python -c 'import sys; print(\"py\", sys.version_info[:2])'\n\
         CMD [\"python3\", \"-m\", \"http.server\", \"8080\"]\n",
        Value::Null,
    )
    .await
    .unwrap();
    e.create_on(
        "nodejs",
        "node",
        "FROM node:18\nRUN node -e 'console.log(\"node\", process.version)' && npm --version\n\
         CMD [\"node\", \"-e\", \"require('http').createServer((q, s) => s.end('ok')).listen(8080)\"]\n",
        Value::Null,
    )
    .await
    .unwrap();
    // Building a base takes minutes (mmdebstrap); the two may be built at once.
    for (name, said) in [("py", "  | py (3, 11)"), ("node", "  | node v18.")] {
        let v = e.ended(name, Duration::from_secs(1800)).await;
        let log = std::fs::read_to_string(e.version_dir(name).join("build.log")).unwrap_or_default();
        assert_eq!(v["state"], "SUCCESSFUL", "{v}\n{log}");
        assert!(log.contains(said), "{log}");
    }
    e.no_qemu(Duration::from_secs(10)).await;
}
