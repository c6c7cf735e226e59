//! The Python SDK (`sdk/python`) and forks through the API, end to end: pytest runs the
//! SDK's own tests (`sdk/python/tests`) against a `hearth serve` started here, with real
//! microvms: commands, streaming, background commands, files with hashes, forks (and a
//! fork of a fork that outlives its parent), suspend/resume, a port through its URL, the
//! asyncio variant and typed errors. The SDK is imported from the working tree (so the
//! test sees the code it tests; `scripts/test.sh` also installs it into `target/pyenv`
//! with pytest). Afterwards nothing of the microvms is left: no QEMU, no run directory,
//! no microvm directory (forks' disks included). Then a daemon killed mid-fork (the source
//! stopped for the copy): the next start continues the source and settles the fork.

mod daemon;

use daemon::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_python_sdk_and_forks_against_a_real_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM minimal\nRUN mkdir -p /www /workspace && echo ok > /www/ready\nCMD busybox httpd -f -p 8080 -h /www\n",
    )
    .unwrap();
    allow_artifacts(&state, &a, &ctx);
    let _microvms = Microvms(state.clone());
    let daemon = Daemon::start(&state);

    let key: serde_json::Value = serde_json::from_str(&a).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python");
    let py = python();
    let has_pytest = Command::new(&py).args(["-c", "import pytest"]).status().is_ok_and(|s| s.success());
    assert!(has_pytest, "pytest is missing from {}: scripts/test.sh installs it (with the SDK)", py.display());
    // Python with the SDK of this tree, configured for `daemon` and key `a` from the environment.
    let sdk_python = |daemon: &Daemon| {
        let mut c = Command::new(&py);
        c.current_dir(&root)
            .env("PYTHONPATH", root.join("src"))
            .env("HEARTH_URL", &daemon.1)
            .env("AWS_ACCESS_KEY_ID", key["accessKeyId"].as_str().unwrap())
            .env("AWS_SECRET_ACCESS_KEY", key["secretAccessKey"].as_str().unwrap())
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", tmp.path().join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", tmp.path().join("no-aws-credentials"));
        c
    };
    let out = sdk_python(&daemon)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "tests"])
        .env("HEARTH_SDK_CTX", &ctx)
        .env("HEARTH_KEY_B", &b)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pytest failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed") && !stdout.contains("skipped"), "{stdout}");

    // Every sandbox the tests made is gone, and the pool was turned off at the end: no
    // QEMU, run directory or microvm directory is left (the policy pass retires the pool).
    let leftovers = || {
        let run = state.join("run");
        let runs: Vec<_> = std::fs::read_dir(&run).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        let dirs: Vec<_> = std::fs::read_dir(state.join("microvms")).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        let qemus = Command::new("pgrep").arg("-f").arg(format!("{}/", run.display())).output().map(|o| o.stdout).unwrap_or_default();
        (runs, dirs, String::from_utf8_lossy(&qemus).trim().to_owned())
    };
    let nothing_left = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (runs, dirs, qemus) = leftovers();
            if runs.is_empty() && dirs.is_empty() && qemus.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "left after {what}: run dirs {runs:?}, microvm dirs {dirs:?}, QEMU pids {qemus:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    nothing_left("the SDK tests");
    drop(daemon);

    // A daemon killed while a fork's source is stopped for the copy (crash point
    // `fork.stopped`): the next start continues the source, which answers with its data,
    // and settles the fork (PENDING) as TERMINATED, nothing of it left.
    let log = tmp.path().join("crash.log");
    let mut daemon = Daemon::start_with(&state, &[("HEARTH_CRASH_AT", "fork.stopped")], &log);
    let cli = |d: &Daemon, args: &[&str]| client(d, &a).args(args).output().unwrap();
    let o = cli(&daemon, &["run", "sdk", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{o:?}"));
    assert_eq!(v["state"], "RUNNING", "{v}");
    let source = v["microvmId"].as_str().unwrap().to_owned();
    let o = cli(&daemon, &["exec", &source, "--shell", "--", "echo kept > /workspace/k"]);
    assert!(o.status.success(), "{o:?}");
    let ids = |d: &Daemon| -> Vec<serde_json::Value> {
        let o = cli(d, &["ls", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_else(|_| panic!("{o:?}")).as_array().unwrap().clone()
    };
    let before: Vec<serde_json::Value> = ids(&daemon).iter().map(|m| m["microvmId"].clone()).collect();
    let fork = format!("from hearth import Client, Sandbox; Sandbox({source:?}, Client()).fork()");
    let o = sdk_python(&daemon).args(["-c", &fork]).output().unwrap();
    assert!(!o.status.success(), "the fork should have met the crash point: {o:?}");
    let died = daemon.0.wait().unwrap();
    assert!(!died.success(), "{died:?}");
    let daemon = Daemon::start(&state);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = cli(&daemon, &["exec", &source, "--", "cat", "/workspace/k"]);
        if o.status.success() {
            assert_eq!(o.stdout, b"kept\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fork's source did not come back: {o:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The fork's record (the one microvm new since the call): TERMINATED.
    let new: Vec<serde_json::Value> = ids(&daemon).into_iter().filter(|m| !before.contains(&m["microvmId"])).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let o = cli(&daemon, &["get", new[0]["microvmId"].as_str().unwrap(), "--json"]);
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{o:?}"));
    assert_eq!(got["state"], "TERMINATED", "{got}");
    let o = cli(&daemon, &["rm", &source]);
    assert!(o.status.success(), "{o:?}");
    nothing_left("the interrupted fork");
    drop(daemon);
}
