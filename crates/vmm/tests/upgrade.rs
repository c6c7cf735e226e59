//! Upgrades keep running VMs: a detached VM started by the previous release's engine (old
//! QEMU process name, `vm.json` without a version) is taken back by this one, and a VM this
//! release names is found again by its new process name.
//!
//! The previous release is built at test time: the tree of [`PREVIOUS_RELEASE`] (`git
//! archive`, into the target directory's `tmp/`) with a small example that boots a detached
//! VM and lets it run on, compiled into the same target directory (its crates renamed, so
//! their artifacts do not replace this tree's), so only `hearth-proto` and `hearth-vmm`
//! compile (~10 s on 2 cores once the dependencies are built; the tree is kept, so later
//! runs are fresh). Only the engine is built, not the `hearth` binary:
//! reattaching is the engine's, and building the daemon too would cost minutes for
//! nothing this test checks.
//!
//! It needs what the other real-VM tests need (`scripts/setup.sh --debian`: kernel and
//! initramfs in `$HEARTH_HOME`) and git with this repository's history.

use hearth_vmm::{Vm, VmConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The last release before `vm.json` had a version and VMs had names.
const PREVIOUS_RELEASE: &str = "3197a9946561b1604723d9374a9ad8eccc1486f5";

const EXAMPLE: &str = "previous_release_start_detached";

/// Written into the previous release's tree: its own API, unchanged since.
const EXAMPLE_SOURCE: &str = r#"//! Boots a detached VM with this release's engine, lets it run on, prints its run directory.
#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut cfg = hearth_vmm::VmConfig::new(&a[1], &a[2]);
    cfg.run_root = a[3].clone().into();
    cfg.detached = true;
    cfg.boot_timeout = std::time::Duration::from_secs(180);
    if let Ok(accel) = std::env::var("HEARTH_ACCEL") {
        cfg.accel = accel.parse().expect("HEARTH_ACCEL");
    }
    let vm = hearth_vmm::Vm::boot(cfg).await.expect("boot");
    println!("{}", vm.release().display());
}
"#;

/// Builds the previous release's example; returns the binary.
fn previous_release_starter() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.parent().expect("the target directory");
    let src = tmp.join(format!("hearth-{}", &PREVIOUS_RELEASE[..12]));
    if !src.join("Cargo.toml").is_file() {
        let staging = tmp.join(format!(".hearth-{}.{}", &PREVIOUS_RELEASE[..12], std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).unwrap();
        let mut git = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["archive", PREVIOUS_RELEASE])
            .stdout(Stdio::piped())
            .spawn()
            .expect("git (the test needs the repository's history)");
        let tar = Command::new("tar").arg("-x").arg("-C").arg(&staging).stdin(git.stdout.take().unwrap()).status().unwrap();
        assert!(git.wait().unwrap().success() && tar.success(), "cannot extract {PREVIOUS_RELEASE} (a shallow clone?)");
        // Cargo names a workspace crate's artifacts after its path *relative to the
        // workspace root*: under `crates/` the old crates would overwrite this tree's in
        // the shared target directory. Under `previous-crates/` they are others.
        std::fs::rename(staging.join("crates"), staging.join("previous-crates")).unwrap();
        let manifest = std::fs::read_to_string(staging.join("Cargo.toml")).unwrap();
        std::fs::write(staging.join("Cargo.toml"), manifest.replace("\"crates/", "\"previous-crates/")).unwrap();
        std::fs::rename(&staging, &src).unwrap();
    }
    let example = src.join("previous-crates/vmm/examples").join(format!("{EXAMPLE}.rs"));
    if std::fs::read_to_string(&example).ok().as_deref() != Some(EXAMPLE_SOURCE) {
        std::fs::create_dir_all(example.parent().unwrap()).unwrap();
        std::fs::write(&example, EXAMPLE_SOURCE).unwrap();
    }
    let started = std::time::Instant::now();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", target)
        .args(["build", "--locked", "-q", "-p", "hearth-vmm", "--example", EXAMPLE])
        .status()
        .unwrap();
    assert!(status.success(), "building {PREVIOUS_RELEASE}'s engine failed");
    eprintln!("previous release built in {:?}", started.elapsed());
    target.join("debug/examples").join(EXAMPLE)
}

/// Kills the QEMU of every run directory it holds and removes them, on every path.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            let record = std::fs::read(dir.join("vm.json")).ok().and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok());
            if let Some((pid, id)) = record.as_ref().and_then(|r| Some((r["pid"].as_u64()?, r["id"].as_str()?))) {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if hearth_vmm::qemu::cmdline_names_vm(&cmdline, id) {
                    // SAFETY: kill(2) on a pid just checked to be this VM's QEMU.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn cmdline(vm: &Vm) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", vm.pid())).unwrap()).replace('\0', " ")
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_the_previous_release_and_named_vms_are_reattached() {
    let home = hearth_vmm::home::hearth_home();
    let (kernel, initramfs) =
        hearth_vmm::assets::boot_files(&home).unwrap_or_else(|e| panic!("{e} (the tests need `scripts/setup.sh --debian` first)"));
    let run_root = home.join("run");
    let starter = previous_release_starter();
    let mut cleanup = Cleanup(Vec::new());

    // Started by the previous release, which then exits.
    let out = Command::new(&starter).arg(&kernel).arg(&initramfs).arg(&run_root).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "the previous release could not start a VM");
    let old_dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    cleanup.0.push(old_dir.clone());
    assert!(record(&old_dir).get("version").is_none(), "not the old format: {}", record(&old_dir));

    let old = Vm::reattach(&old_dir).await.unwrap_or_else(|e| panic!("reattaching the previous release's VM: {e}"));
    let id = old.id().to_owned();
    assert!(cmdline(&old).contains(&format!("-name {id},process=hearth-{id} ")), "{}", cmdline(&old));
    assert_eq!(old.name(), None);
    assert_eq!(old.qmp("query-status", None).await.unwrap()["status"], "running");
    // Taken over in this release's format.
    assert_eq!(record(&old_dir)["version"], 2);

    // A VM this release names: the name is in its process name, and it is found again.
    let mut cfg = VmConfig::new(&kernel, &initramfs);
    cfg.run_root = run_root.clone();
    cfg.detached = true;
    cfg.boot_timeout = Duration::from_secs(180);
    cfg.name = Some("mvm-0123456789abcdef".into());
    if let Ok(accel) = std::env::var("HEARTH_ACCEL") {
        cfg.accel = accel.parse().expect("HEARTH_ACCEL");
    }
    let named = Vm::boot(cfg).await.unwrap_or_else(|e| panic!("boot failed: {e}"));
    let named_id = named.id().to_owned();
    cleanup.0.push(named.run_dir().to_path_buf());
    assert!(cmdline(&named).contains(&format!("-name {named_id},process=hearth-{named_id}-mvm-0123456789abcdef ")), "{}", cmdline(&named));
    let named_dir = named.release();
    let named = Vm::reattach(&named_dir).await.unwrap_or_else(|e| panic!("reattaching a named VM: {e}"));
    assert_eq!((named.id(), named.name()), (named_id.as_str(), Some("mvm-0123456789abcdef")));

    old.kill().await;
    named.kill().await;
    assert!(!old_dir.exists() && !named_dir.exists());
}
