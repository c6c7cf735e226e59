//! End-to-end tests of snapshots against real QEMU VMs: templates and clones, suspend and
//! resume cycles, forks, and damaged snapshots. Set-up as for `engine.rs`.

mod common;

use bytes::Bytes;
use common::config;
use hearth_image::base::Base;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{BootError, Memory, RestoreOptions, Snapshot, Vm};
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

/// Boots a busybox VM, prepares some state, and turns it into a template in `dir`.
async fn make_template(dir: &Path) -> Snapshot {
    let mut cfg = config(Base::Busybox);
    cfg.memory = Memory::SnapshotReady;
    let vm = Vm::boot(cfg).await.unwrap();
    sh(&vm, "echo from-template > /workspace/seed; (sleep 100000 &) ; true").await;
    vm.snapshot_template(dir).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clones_of_one_template_are_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = make_template(&tmp.path().join("tpl")).await;
    let o = opts();
    let launches = (0..5).map(|_| Vm::launch(&snap, &o));
    let vms: Vec<Vm> = futures_util::future::join_all(launches).await.into_iter().map(|r| r.unwrap()).collect();

    let mut randoms = Vec::new();
    let mut hostnames = Vec::new();
    let mut machine_ids = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        // State from the template is there, and the template's process survived.
        assert_eq!(sh(vm, "cat /workspace/seed").await, "from-template\n");
        assert_eq!(sh(vm, "ps -o args | grep -c '^sleep 100000' || true").await.trim(), "1");
        // Each clone writes its own file and starts its own process.
        sh(vm, &format!("echo clone-{i} > /workspace/mine; (sleep {} &); true", 200000 + i)).await;
        randoms.push(sh(vm, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").await);
        hostnames.push(sh(vm, "hostname").await);
        machine_ids.push(sh(vm, "cat /etc/machine-id").await);
    }
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(sh(vm, "cat /workspace/mine").await, format!("clone-{i}\n"), "files leaked between clones");
        let procs = sh(vm, "ps -o args | grep '^sleep 2000' || true").await;
        assert_eq!(procs.trim(), format!("sleep {}", 200000 + i), "processes leaked between clones");
    }
    for list in [&randoms, &hostnames, &machine_ids] {
        let mut uniq = list.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), list.len(), "clones share values: {list:?}");
    }
    // The restored agent idles: PID 1 accumulates (almost) no CPU time while waiting. A
    // spinning agent (seen once: tokio's sticky hang-up readiness) burns ~200 ticks in 2 s.
    let ticks = sh(&vms[0], "a=$(cut -d' ' -f14,15 /proc/1/stat); sleep 2; b=$(cut -d' ' -f14,15 /proc/1/stat); echo $a $b").await;
    let t: Vec<u64> = ticks.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert!(t[2] + t[3] - t[0] - t[1] < 50, "the restored agent is busy while idle: {ticks}");
    // The wall clock was corrected on restore (within a minute of the host's).
    let guest: i64 = sh(&vms[0], "date +%s").await.trim().parse().unwrap();
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((guest - host).abs() < 60, "guest clock {guest}, host {host}");
    // The template itself is untouched by its clones.
    let again = Snapshot::open(&snap.dir).unwrap();
    assert_eq!(again.manifest, snap.manifest);
    for vm in vms {
        vm.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_suspend_resume_cycles_keep_processes_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let vm = Vm::boot(config(Base::Busybox)).await.unwrap();
    // (busybox-static has no nohup; a subshell detaches the job just as well. The counter
    // is replaced by rename so a reader never sees it truncated.)
    sh(&vm, "(sh -c 'i=0; while true; do i=$((i+1)); echo $i > /workspace/counter.tmp; mv /workspace/counter.tmp /workspace/counter; sleep 0.05; done' >/dev/null 2>&1 &)").await;
    // An open file descriptor that must survive too.
    sh(&vm, "(sh -c 'exec 3>/workspace/held; while true; do echo tick >&3; sleep 0.2; done' >/dev/null 2>&1 &)").await;
    let mut vm = vm;
    let mut last = 0u64;
    for cycle in 0..20 {
        vm.agent()
            .write_file_bytes(&BinPath::from(format!("/workspace/cycle-{cycle}").as_str()), None, Bytes::from(format!("data {cycle}\n")))
            .await
            .unwrap();
        let snap = match vm.suspend(&dir).await {
            Ok(s) => s,
            Err((_, e)) => panic!("suspend {cycle}: {e}"),
        };
        vm = Vm::resume(&snap, &opts()).await.unwrap_or_else(|e| panic!("resume {cycle}: {e}"));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let n: u64 = sh(&vm, "cat /workspace/counter").await.trim().parse().unwrap();
        assert!(n > last, "cycle {cycle}: counter {n} did not advance past {last}");
        last = n;
    }
    for cycle in 0..20 {
        assert_eq!(sh(&vm, &format!("cat /workspace/cycle-{cycle}")).await, format!("data {cycle}\n"));
    }
    let ticks: usize = sh(&vm, "grep -c tick /workspace/held").await.trim().parse().unwrap();
    assert!(ticks > 5, "the held file stopped growing: {ticks}");
    vm.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_copies_a_running_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::boot(config(Base::Busybox)).await.unwrap();
    sh(&vm, "echo before > /workspace/f; (sleep 300000 &); true").await;
    // An exec in flight across the fork: the original keeps it.
    let mut running = vm.exec_stream(&ExecRequest::shell("sleep 2; echo survived")).await.unwrap();
    running.close_stdin();
    let snap = vm.fork_snapshot(&tmp.path().join("fork")).await.unwrap();
    let mut got = Vec::new();
    while let Some(ev) = running.next_event().await.unwrap() {
        got.push(ev);
    }
    assert_eq!(got.first(), Some(&hearth_vmm::agent::ExecEvent::Stdout(Bytes::from("survived\n"))), "{got:?}");
    // The original runs on.
    sh(&vm, "echo original > /workspace/f").await;
    let o = opts();
    let copies: Vec<Vm> =
        futures_util::future::join_all((0..2).map(|_| Vm::launch_fork(&snap, &o))).await.into_iter().map(|r| r.unwrap()).collect();
    for (i, c) in copies.iter().enumerate() {
        assert_eq!(sh(c, "cat /workspace/f").await, "before\n");
        assert_eq!(sh(c, "ps -o args | grep -c '^sleep 300000' || true").await.trim(), "1");
        sh(c, &format!("echo copy-{i} > /workspace/f")).await;
    }
    assert_eq!(sh(&copies[0], "cat /workspace/f").await, "copy-0\n");
    assert_eq!(sh(&copies[1], "cat /workspace/f").await, "copy-1\n");
    assert_eq!(sh(&vm, "cat /workspace/f").await, "original\n");
    for c in copies {
        c.kill().await;
    }
    vm.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshots_are_refused_with_nothing_left_running() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = make_template(&tmp.path().join("tpl")).await;
    let run_root = tmp.path().join("run");
    let o = RestoreOptions { run_root: run_root.clone(), ..opts() };

    // Corrupted state: the checksum catches it before QEMU runs.
    let copy = tmp.path().join("corrupt");
    copy_dir(&snap.dir, &copy);
    let state = copy.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let e = Snapshot::open(&copy).unwrap_err().to_string();
    assert!(e.contains("corrupted"), "{e}");

    // Truncated state.
    std::fs::write(&state, &bytes[..mid]).unwrap();
    let e = Snapshot::open(&copy).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    // A state file that passes the manifest (re-signed) but is not a QEMU stream: QEMU
    // refuses it, the launch fails cleanly.
    let forged = tmp.path().join("forged");
    copy_dir(&snap.dir, &forged);
    std::fs::write(forged.join("state"), vec![0x42u8; 4096]).unwrap();
    let mut m = Snapshot::open(&snap.dir).unwrap().manifest;
    m.state = hearth_vmm::snapshot::record(&forged, "state").unwrap();
    hearth_vmm::snapshot::write_manifest(&forged, &m).unwrap();
    let s = Snapshot::open(&forged).unwrap();
    let e = Vm::launch(&s, &o).await.err().expect("garbage state accepted");
    assert!(matches!(e, BootError::Restore { .. }), "{e}");

    // Another format version.
    let mut m2 = snap.manifest.clone();
    m2.format_version = 99;
    let other = tmp.path().join("v99");
    copy_dir(&snap.dir, &other);
    hearth_vmm::snapshot::write_manifest(&other, &m2).unwrap();
    let e = Snapshot::open(&other).unwrap_err().to_string();
    assert!(e.contains("version 99") && e.contains("versions 1 to 2"), "{e}");

    // Nothing of the failed launch remains.
    let left: Vec<_> = std::fs::read_dir(&run_root).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Starts a counting process in a VM and suspends it with one `hearth` process, then
/// resumes it twice with new `hearth` processes: the state lives on disk, not in Hearth.
#[test]
fn resume_works_from_a_new_hearth_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm");
    let hearth = env!("CARGO_BIN_EXE_hearth");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(hearth).args(args).output().expect("run hearth");
        assert!(out.status.success(), "hearth {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let d = dir.to_str().unwrap();
    run(&["vm", "run", "--suspend-to", d, "--shell", "--", "(sh -c 'i=0; while true; do i=$((i+1)); echo $i > /workspace/n.tmp; mv /workspace/n.tmp /workspace/n; sleep 0.05; done' >/dev/null 2>&1 &); echo hi > /workspace/note"]);
    assert!(Snapshot::open(&dir).is_ok());
    let first: u64 = run(&["vm", "resume", d, "--shell", "--", "sleep 0.5; cat /workspace/n"]).trim().parse().unwrap();
    // Read after a while too: the loop advances only while the VM runs (under TCG on a
    // busy host one turn can take longer than the resume's first instants).
    let second: u64 = run(&["vm", "resume", d, "--shell", "--", "sleep 1; cat /workspace/n"]).trim().parse().unwrap();
    assert!(second > first && first > 0, "counter {first} then {second}");
    assert_eq!(run(&["vm", "resume", d, "--terminate", "--", "cat", "/workspace/note"]), "hi\n");
}

/// A suspend onto a disk without room fails cleanly: a clear error, no partial files,
/// and the VM keeps running with its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_onto_a_full_disk_keeps_the_vm_running() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let ok = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(ok.success(), "mounting a small tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());

    let vm = Vm::boot(config(Base::Busybox)).await.unwrap();
    // 64 MiB of non-zero guest memory cannot fit in 24 MiB.
    vm.agent().write_file_bytes(&BinPath::from("/dev/shm/fill"), None, Bytes::from(vec![0x5au8; 64 << 20])).await.unwrap();
    sh(&vm, "echo alive > /workspace/state").await;
    let (vm, err) = match vm.suspend(&small.join("vm")).await {
        Ok(_) => panic!("a suspend into 24 MiB succeeded"),
        Err(pair) => pair,
    };
    assert!(vm.is_running(), "the VM died: {err}");
    assert!(err.to_string().contains("space"), "unclear error: {err}");
    assert_eq!(sh(&vm, "cat /workspace/state").await, "alive\n");
    assert_eq!(sh(&vm, "wc -c < /dev/shm/fill").await.trim(), (64u64 << 20).to_string());
    let left: Vec<_> = std::fs::read_dir(&small).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
    vm.kill().await;
}

/// QEMU killed in the middle of a suspend: the suspend reports the failure, the VM is
/// reported stopped, and no half-written snapshot is left to be mistaken for a good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_during_suspend_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = Vm::boot(config(Base::Busybox)).await.unwrap();
    vm.agent().write_file_bytes(&BinPath::from("/dev/shm/fill"), None, Bytes::from(vec![0x33u8; 128 << 20])).await.unwrap();
    let pid = vm.pid() as i32;
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        // SAFETY: kill(2) on QEMU's pid, which this test owns.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let dest = tmp.path().join("vm");
    let r = vm.suspend(&dest).await;
    killer.await.unwrap();
    match r {
        Ok(_) => {
            // The suspend won the race: then the snapshot must be complete and valid.
            Snapshot::open(&dest).expect("a completed suspend must be valid");
        }
        Err((vm, e)) => {
            assert!(!vm.is_running(), "QEMU was killed but the VM reports running ({e})");
            assert!(Snapshot::open(&dest).is_err(), "a failed suspend left a snapshot");
            let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "partial files left: {left:?}");
        }
    }
}
