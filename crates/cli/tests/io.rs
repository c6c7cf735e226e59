//! Per-microvm I/O through `hearth serve`: a file larger than any buffer goes into a
//! microvm and back with `hearth cp` (the same bytes) while the daemon's memory stays flat
//! (the transfer is streamed, never held whole); a write whose body is not what was signed
//! leaves the guest's file untouched; a missing file is a 404; the daemon's `--net-rate`
//! is on the microvm's devices.

mod daemon;
#[path = "io/files.rs"]
mod files;

use daemon::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const FILE_MIB: u64 = 64;

fn json_of(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
}

/// Runs `f` while sampling the daemon's RSS every 20 ms; returns the peak (KiB) seen.
fn peak_rss_during(pid: u32, f: impl FnOnce()) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    f();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    peak.load(Ordering::Relaxed)
}

fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().to_owned()
}

/// A signed streamed PUT whose X-Amz-Content-Sha256 claims `claimed` for `body`.
fn put_claiming(d: &Daemon, key: &str, id: &str, path: &str, body: Vec<u8>, claimed: &str) -> (u16, String) {
    put_signed(d, key, &format!("/hearth/v1/microvms/{id}/files?path={path}"), reqwest::Body::from(body), claimed)
}

/// A signed streamed PUT of `body` (chunked when it is a stream) to `path_and_query`,
/// claiming `claimed` as its SHA-256.
fn put_signed(d: &Daemon, key: &str, path_and_query: &str, body: reqwest::Body, claimed: &str) -> (u16, String) {
    let key: Value = serde_json::from_str(key).unwrap();
    let url = format!("{}{path_and_query}", d.1);
    let uri: http::Uri = url.parse().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("host", uri.authority().unwrap().as_str().parse().unwrap());
    hearth_api::sigv4::sign_streamed(
        &http::Method::PUT,
        &uri,
        &mut headers,
        claimed,
        key["accessKeyId"].as_str().unwrap(),
        key["secretAccessKey"].as_str().unwrap(),
        "us-east-1",
        std::time::SystemTime::now(),
    )
    .unwrap();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let mut req = reqwest::Client::new().put(&url).body(body);
        for (k, v) in &headers {
            if k != "host" {
                req = req.header(k, v);
            }
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

#[test]
fn files_stream_through_the_daemon_and_limits_reach_the_microvm() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let key = key(&state);
    let _microvms = Microvms(state.clone());
    let d = Daemon::start_args(&state, &["--net-rate", "8", "--disk-iops", "100000"]);
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM minimal\n").unwrap();
    let o = client(&d, &key).args(["images", "create", "io", "--base", "minimal"]).arg(&ctx).output().unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("SUCCESSFUL"), "{o:?}");
    let v = json_of(&client(&d, &key).args(["run", "io", "--json"]).output().unwrap());
    let id = v["microvmId"].as_str().unwrap().to_owned();
    let cli = |args: &[&str]| client(&d, &key).args(args).output().unwrap();

    // 64 MiB of incompressible bytes, in and out, with the daemon's RSS sampled.
    let local = tmp.path().join("big");
    let o = Command::new("head").args(["-c", &format!("{}", FILE_MIB << 20), "/dev/urandom"]).output().unwrap();
    std::fs::write(&local, &o.stdout).unwrap();
    let want = sha256(&local);
    let pid = d.0.id();
    let before = rss_kib(pid);
    let remote = format!("{id}:/workspace/big");
    let peak_in = peak_rss_during(pid, || {
        let o = cli(&["cp", local.to_str().unwrap(), &remote]);
        assert!(o.status.success(), "cp in: {o:?}");
    });
    let o = cli(&["exec", &id, "--", "sha256sum", "/workspace/big"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&want), "in the guest: {o:?}, want {want}");
    let back = tmp.path().join("back");
    let peak_out = peak_rss_during(pid, || {
        let o = cli(&["cp", &remote, back.to_str().unwrap()]);
        assert!(o.status.success(), "cp out: {o:?}");
    });
    assert_eq!(sha256(&back), want);
    let grew = peak_in.max(peak_out).saturating_sub(before);
    eprintln!("daemon RSS {before} KiB before, peaks {peak_in} KiB in, {peak_out} KiB out: grew {grew} KiB for a {FILE_MIB} MiB file");
    assert!(grew < (FILE_MIB << 10) / 2, "the daemon grew by {grew} KiB moving a {FILE_MIB} MiB file: it buffers");

    // A body that is not what was signed: refused, and the guest's file stays as it was.
    let body = b"not what was signed".to_vec();
    let (status, text) = put_claiming(&d, &key, &id, "/workspace/big", body, &"0".repeat(64));
    assert_eq!(status, 403, "{text}");
    let o = cli(&["exec", &id, "--", "sha256sum", "/workspace/big"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&want), "after a refused write: {o:?}");
    // The agent removes its temporary file once it sees the stream end in an error, which
    // may be just after the daemon has answered.
    let t = std::time::Instant::now();
    loop {
        let o = cli(&["exec", &id, "--", "sh", "-c", "ls -a /workspace"]);
        if !String::from_utf8_lossy(&o.stdout).contains(".hearth-upload") {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "a temporary file stays: {o:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The error semantics stay: a missing file is a 404, a directory a 400.
    let o = cli(&["cp", &format!("{id}:/workspace/nothing"), tmp.path().join("x").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("(404)"), "{o:?}");
    let o = cli(&["cp", &format!("{id}:/workspace"), tmp.path().join("x").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("(400)"), "{o:?}");

    // The operator's network rate is on the devices of every VM of the daemon (the
    // microvm's, and any warm pool's waiting to become one).
    let run: Vec<String> =
        std::fs::read_dir(state.join("run")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!run.is_empty());
    for vm in run {
        let o = Command::new("tc").args(["-n", &format!("hearth-{vm}"), "qdisc", "show"]).output().unwrap();
        let q = String::from_utf8_lossy(&o.stdout);
        assert!(q.lines().filter(|l| l.contains("tbf") && l.contains("rate 8Mbit")).count() == 2, "{vm}: {q}");
    }
}
