//! ARM64 guests end to end, on real QEMU (`qemu-system-aarch64 -M virt`, emulated by TCG
//! on an x86-64 host): a cold boot and an exec (the cross-compiled busybox's applets),
//! then a template snapshot and a clone launched from it, suspended and resumed. One VM
//! boots (ARM64 cold boots under TCG take tens of seconds), so the suite stays short.
//! Needs `hearth setup --arch arm64` (done by `scripts/setup.sh`).

use hearth_image::base::Base;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Arch, Disk, DiskFormat, Memory, RestoreOptions, Vm, VmConfig};
use std::time::Duration;

fn arm64_config() -> VmConfig {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let home = hearth_vmm::home::hearth_home();
    let (kernel, initramfs) = hearth_vmm::assets::boot_files_for(&home, Arch::Aarch64)
        .unwrap_or_else(|e| panic!("{e} (the tests need `scripts/setup.sh` first)"));
    let rootfs = hearth_image::base_arm64::path_for(Base::Busybox, Arch::Aarch64, &home).unwrap();
    assert!(rootfs.is_file(), "{} missing: run `scripts/setup.sh` first", rootfs.display());
    let mut cfg = VmConfig::for_arch(kernel, initramfs, Arch::Aarch64);
    cfg.root = Some(Disk::base(rootfs, DiskFormat::Raw));
    cfg.run_root = home.join("run");
    // Generous: an emulated ARM64 guest on a loaded 2-core host.
    cfg.boot_timeout = Duration::from_secs(300);
    if let Ok(args) = std::env::var("HEARTH_KERNEL_ARGS") {
        cfg.extra_cmdline = args.split_whitespace().map(str::to_owned).collect();
    }
    cfg
}

async fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec(&ExecRequest::shell(script), None, 1 << 20).await.unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.exit.success(), "{script}: exit {:?}, stderr {}", out.exit, out.stderr_str());
    out.stdout_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm64_guest_boots_clones_suspends_and_resumes() {
    let mut cfg = arm64_config();
    cfg.memory = Memory::SnapshotReady;
    let vm = Vm::boot(cfg).await.unwrap();
    assert_eq!(vm.accel(), hearth_vmm::Accel::Tcg, "an ARM64 guest is emulated on this host");
    assert_eq!(sh(&vm, "uname -m").await.trim(), "aarch64");
    // The cross-compiled busybox has every applet, as the x86-64 one (Debian's
    // `busybox-static:arm64` had no `nohup` and its `wget -T` crashed); `localhost` comes
    // from /etc/hosts.
    let applets = sh(&vm, "busybox --list | wc -l; nohup true && echo nohup; wget -T 5 -q -O- http://localhost:9/ 2>&1; echo $?").await;
    let lines: Vec<&str> = applets.lines().collect();
    assert!(lines.len() >= 2 && lines[0].trim().parse::<u32>().is_ok_and(|n| n >= 390) && lines[1] == "nohup", "{applets}");
    assert!(applets.contains("127.0.0.1") && lines.last() == Some(&"1"), "wget -T: {applets}");
    sh(&vm, "echo from-template > /workspace/seed; (sleep 100000 &); true").await;
    let template_host = sh(&vm, "hostname").await;

    let tmp = tempfile::tempdir().unwrap();
    let snap = vm.snapshot_template(&tmp.path().join("tpl")).await.unwrap();
    assert_eq!(snap.manifest.arch, Arch::Aarch64);

    let mut opts = RestoreOptions::new();
    opts.timeout = Duration::from_secs(300);
    let (clone, other) = tokio::join!(Vm::launch(&snap, &opts), Vm::launch(&snap, &opts));
    let (clone, other) = (clone.unwrap(), other.unwrap());
    // No vmgenid on `virt` (docs/ARCHITECTURE.md "ARM64 guests"): the agent's restore
    // reseeding alone must part the clones' random streams.
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert_ne!(sh(&clone, random).await, sh(&other, random).await, "two clones share their random stream");
    other.shutdown().await;
    assert_eq!(sh(&clone, "uname -m").await.trim(), "aarch64");
    assert_eq!(sh(&clone, "cat /workspace/seed").await, "from-template\n");
    assert_eq!(sh(&clone, "ps -o args | grep -c '^sleep 100000' || true").await.trim(), "1", "the template's process survives");
    assert_ne!(sh(&clone, "hostname").await, template_host, "a clone gets its own identity");
    // The clone's clock was set from the host's at launch.
    let guest: i64 = sh(&clone, "date +%s").await.trim().parse().unwrap();
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((guest - host).abs() < 60, "guest clock {guest}, host {host}");

    // Suspend (a mapped-ram migration file, a diff over the template's RAM) and resume.
    sh(&clone, "echo suspended-state > /workspace/mine").await;
    let suspended = match clone.suspend(&tmp.path().join("suspended")).await {
        Ok(s) => s,
        Err((_, e)) => panic!("suspend: {e}"),
    };
    assert_eq!(suspended.manifest.arch, Arch::Aarch64);
    // The image holds what changed since the template (a few MiB), not `virt`'s two zeroed
    // 64 MiB flash devices as well (they made it 137 MiB before ramdiff left zeros as holes).
    let st = std::fs::metadata(suspended.dir.join("state")).unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&st) * 512;
    assert!(allocated < 64 << 20, "a suspended ARM64 clone takes {allocated} bytes (template state {})", snap.manifest.state.size);
    let resumed = Vm::resume(&suspended, &opts).await.unwrap();
    hearth_vmm::restore::finish_resume(&suspended.dir);
    assert_eq!(sh(&resumed, "cat /workspace/mine; uname -m").await, "suspended-state\naarch64\n");
    resumed.shutdown().await;
}
