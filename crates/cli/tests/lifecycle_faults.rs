//! Faults in a microvm's life, injected for real against a `hearth serve`: its QEMU killed
//! from outside (the microvm must be TERMINATED at once with the true reason, exec must
//! answer the model's 409, nothing of it may stay), a suspend and a terminate the daemon
//! makes on purpose (never reported as a crash), and a damaged suspended state (the resume
//! answers the model's ConflictException and the microvm ends with a reason to act on), and
//! a suspend onto a full disk (the model's error, saying so; the microvm runs on).

mod daemon;

use daemon::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn json_of(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn get(d: &Daemon, key: &str, id: &str) -> Value {
    json_of(&client(d, key).args(["get", id, "--json"]).output().unwrap())
}

fn run(d: &Daemon, key: &str) -> String {
    let v = json_of(&client(d, key).args(["run", "faults", "--json"]).output().unwrap());
    assert_eq!(v["state"], "RUNNING", "{v}");
    v["microvmId"].as_str().unwrap().to_owned()
}

/// Waits up to `limit` for microvm `id` to reach `state`; its record then.
fn wait_state(d: &Daemon, key: &str, id: &str, state: &str, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = get(d, key, id);
        if v["state"] == state || t.elapsed() > limit {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pids whose command line names `id` (QEMU's process name carries the microvm id).
fn pids_of(id: &str) -> Vec<u32> {
    let o = std::process::Command::new("pgrep").arg("-f").arg(format!("process=hearth-vm-[0-9a-f]+-{id}")).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn run_dirs(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("run")).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

fn netns() -> String {
    let o = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn qemu_deaths_and_damaged_snapshots_are_told_truthfully() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let key = key(&state);
    let _microvms = Microvms(state.clone());
    // No warm pool: every run directory here is a microvm's.
    let d = Daemon::start_args(&state, &["--pool-size", "0"]);
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM minimal\n").unwrap();
    let o = client(&d, &key).args(["images", "create", "faults", "--base", "minimal"]).arg(&ctx).output().unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("SUCCESSFUL"), "{o:?}");

    // 1. QEMU killed from outside: TERMINATED at once, with the signal; exec is a 409.
    let id = run(&d, &key);
    let pids = pids_of(&id);
    assert_eq!(pids.len(), 1, "one QEMU names {id}: {pids:?}");
    let dirs = run_dirs(&state);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let killed_at = Instant::now();
    // Only this test's QEMU, by its pid.
    assert!(std::process::Command::new("kill").args(["-9", &pids[0].to_string()]).status().unwrap().success());
    let v = wait_state(&d, &key, &id, "TERMINATED", Duration::from_secs(5));
    assert_eq!(v["state"], "TERMINATED", "still {v} {:?} after the kill", killed_at.elapsed());
    eprintln!("TERMINATED {:?} after the kill", killed_at.elapsed());
    let reason = v["stateReason"].as_str().unwrap_or_default();
    assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    assert!(reason.len() <= 2048);
    let o = client(&d, &key).args(["exec", &id, "true"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ConflictException (409)"), "exec on a dead VM: {err}");
    let o = client(&d, &key).args(["suspend", &id]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("(409)"), "{o:?}");
    assert!(run_dirs(&state).is_empty(), "its run directory stays: {:?}", run_dirs(&state));
    assert!(!netns().contains(&dirs[0]), "its namespace stays: {}", netns());
    assert!(!state.join("microvms").join(&id).exists());

    // 2. Stopped on purpose (suspend, terminate): never reported as a crash.
    let a = run(&d, &key);
    let o = client(&d, &key).args(["suspend", &a]).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let b = run(&d, &key);
    let o = client(&d, &key).args(["rm", &b]).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    std::thread::sleep(Duration::from_secs(1));
    let va = get(&d, &key, &a);
    assert_eq!(va["state"], "SUSPENDED", "{va}");
    let vb = get(&d, &key, &b);
    assert_eq!(vb["state"], "TERMINATED", "{vb}");
    for v in [&va, &vb] {
        assert!(!v["stateReason"].as_str().unwrap_or_default().contains("unexpectedly"), "{v}");
    }

    // 3. A damaged suspended state: the resume is a 409 and the microvm ends with a reason.
    let manifest = state.join("microvms").join(&a).join("suspended").join("manifest.json");
    assert!(manifest.is_file(), "{}", manifest.display());
    std::fs::write(&manifest, b"{\"magic\": \"not ours\"").unwrap();
    let o = client(&d, &key).args(["resume", &a]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ConflictException (409)") && err.contains("damaged"), "{err}");
    let va = get(&d, &key, &a);
    assert_eq!(va["state"], "TERMINATED", "{va}");
    assert!(va["stateReason"].as_str().unwrap_or_default().contains("damaged"), "{va}");
    assert!(!state.join("microvms").join(&a).exists());
    assert!(pids_of(&a).is_empty() && pids_of(&b).is_empty());
    assert!(run_dirs(&state).is_empty(), "{:?}", run_dirs(&state));

    // 4. A suspend onto a full disk (an 8 MiB tmpfs where suspends go): the model's
    // InternalServerException saying so, and the microvm keeps RUNNING, usable.
    let microvms = state.join("microvms");
    std::fs::create_dir_all(&microvms).unwrap();
    match Tmpfs::mount(&microvms, "8m") {
        None => eprintln!("skipped the full-disk suspend: cannot mount a tmpfs here"),
        Some(_tmpfs) => {
            let c = run(&d, &key);
            let o = client(&d, &key).args(["suspend", &c]).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && err.contains("InternalServerException (500)") && err.contains("disk space"), "{err}");
            assert!(!err.contains("internal error #"), "an opaque 500: {err}");
            let vc = get(&d, &key, &c);
            assert_eq!(vc["state"], "RUNNING", "{vc}");
            assert!(vc["stateReason"].as_str().unwrap_or_default().contains("disk space"), "{vc}");
            let o = client(&d, &key).args(["exec", &c, "true"]).output().unwrap();
            assert!(o.status.success(), "the VM runs on: {o:?}");
            let o = client(&d, &key).args(["rm", &c]).output().unwrap();
            assert!(o.status.success(), "{o:?}");
            assert!(pids_of(&c).is_empty());
        }
    }
    drop(d);
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "hearth-test-tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
