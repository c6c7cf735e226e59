//! Suspend and resume of VMs launched from a template, against real QEMU: the image holds
//! only the pages the guest changed since the template (`hearth_vmm::ramdiff`), and a
//! resume gets back exactly the bytes the guest wrote and the template's bytes it never
//! touched. Set-up as for `engine.rs`.

mod common;

use bytes::Bytes;
use common::config;
use hearth_image::base::Base;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Memory, RestoreOptions, Snapshot, Vm};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

fn opts() -> RestoreOptions {
    let mut o = RestoreOptions::new();
    o.timeout = Duration::from_secs(std::env::var("HEARTH_RESTORE_TIMEOUT").ok().and_then(|t| t.parse().ok()).unwrap_or(120));
    o
}

async fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec(&ExecRequest::shell(script), None, 16 << 20).await.unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.exit.success(), "{script}: exit {:?}, stderr {}", out.exit, out.stderr_str());
    out.stdout_str()
}

/// Allocated bytes of a file (its blocks, not its length: images are sparse).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A template whose RAM holds 32 MiB of known bytes in tmpfs (RAM only, not on disk) and a
/// process; returns it with the hash of those bytes.
async fn make_template(dir: &Path) -> (Snapshot, String) {
    let mut cfg = config(Base::Busybox);
    cfg.memory = Memory::SnapshotReady;
    let vm = Vm::boot(cfg).await.unwrap();
    vm.agent().write_file_bytes(&BinPath::from("/dev/shm/template"), None, Bytes::from(pseudo_random(32 << 20, 7))).await.unwrap();
    sh(&vm, "(sleep 100000 &) ; true").await;
    let hash = sh(&vm, "sha256sum /dev/shm/template").await;
    (vm.snapshot_template(dir).await.unwrap(), hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_writes_what_changed_and_resume_reads_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (tpl, tpl_hash) = make_template(&tmp.path().join("tpl")).await;
    let dir = tmp.path().join("vm");
    let vm = Vm::launch(&tpl, &opts()).await.unwrap();

    // Nothing changed since the template: a few MiB (device state, the pages the restore
    // and one exec touched), not the template's RAM.
    let snap = vm.suspend(&dir).await.unwrap_or_else(|(_, e)| panic!("suspend: {e}"));
    assert_eq!(snap.manifest.format_version, 2);
    assert!(snap.manifest.memory.is_some());
    let idle = allocated(&dir.join("state"));
    assert!(idle < 24 << 20, "a suspend right after launch wrote {} MiB", idle >> 20);
    assert_eq!(
        std::fs::metadata(dir.join("memory")).unwrap().ino(),
        std::fs::metadata(tpl.path("memory")).unwrap().ino(),
        "the base is a link, not a copy"
    );
    let mut vm = Vm::resume(&snap, &opts()).await.unwrap();
    hearth_vmm::restore::finish_resume(&dir);
    assert_eq!(sh(&vm, "sha256sum /dev/shm/template").await, tpl_hash);

    // 200 MiB written: the image grows by about that much, whatever the RAM size.
    let data = pseudo_random(200 << 20, 42);
    vm.agent().write_file_bytes(&BinPath::from("/dev/shm/dirty"), None, Bytes::from(data)).await.unwrap();
    let hash = sh(&vm, "sha256sum /dev/shm/dirty").await;
    for cycle in 0..2 {
        let snap = vm.suspend(&dir).await.unwrap_or_else(|(_, e)| panic!("suspend {cycle}: {e}"));
        let used = allocated(&dir.join("state"));
        assert!((200 << 20..260 << 20).contains(&used), "cycle {cycle}: a suspend after writing 200 MiB wrote {} MiB", used >> 20);
        vm = Vm::resume(&snap, &opts()).await.unwrap_or_else(|e| panic!("resume {cycle}: {e}"));
        hearth_vmm::restore::finish_resume(&dir);
        assert_eq!(sh(&vm, "sha256sum /dev/shm/dirty").await, hash, "cycle {cycle}: the written bytes");
        assert_eq!(sh(&vm, "sha256sum /dev/shm/template").await, tpl_hash, "cycle {cycle}: the template's bytes");
        assert_eq!(sh(&vm, "ps -o args | grep -c '^sleep 100000' || true").await.trim(), "1");
    }
    // Pages freed and zeroed by the guest are zeros after a resume, not the template's.
    sh(&vm, "rm /dev/shm/template /dev/shm/dirty; head -c 100000000 /dev/zero > /dev/shm/zeros").await;
    let zeros = sh(&vm, "sha256sum < /dev/shm/zeros").await;
    let snap = vm.suspend(&dir).await.unwrap_or_else(|(_, e)| panic!("suspend: {e}"));
    let vm = Vm::resume(&snap, &opts()).await.unwrap();
    assert_eq!(sh(&vm, "sha256sum < /dev/shm/zeros").await, zeros);
    vm.kill().await;
}

/// A template-launched VM suspended by this process resumes in a new `hearth` process
/// (as after a daemon restart), jailed there, twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_resumes_in_a_new_hearth_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (tpl, tpl_hash) = make_template(&tmp.path().join("tpl")).await;
    let vm = Vm::launch(&tpl, &opts()).await.unwrap();
    vm.agent().write_file_bytes(&BinPath::from("/dev/shm/note"), None, Bytes::from_static(b"written before suspend\n")).await.unwrap();
    let dir = tmp.path().join("vm");
    vm.suspend(&dir).await.unwrap_or_else(|(_, e)| panic!("suspend: {e}"));
    let hearth = env!("CARGO_BIN_EXE_hearth");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(hearth).args(args).output().expect("run hearth");
        assert!(out.status.success(), "hearth {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let d = dir.to_str().unwrap();
    assert_eq!(run(&["vm", "resume", d, "--", "cat", "/dev/shm/note"]), "written before suspend\n");
    assert_eq!(run(&["vm", "resume", d, "--terminate", "--", "sha256sum", "/dev/shm/template"]), tpl_hash);
}
