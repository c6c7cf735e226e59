//! The jail around QEMU ([`hearth_vmm::jail`]), tried from outside on real VMs: what the
//! kernel says about the process, its cgroup's limits, what its mount and PID namespaces
//! hold, and a guest that touches more memory than its cgroup allows. Needs root (they
//! are skipped otherwise) and cgroups v1 under /sys/fs/cgroup; the v2 code is tried on
//! this host's controller-less cgroup2 (`/sys/fs/cgroup/unified`) here and in
//! `hearth_vmm::jail::hierarchy`'s unit tests.

mod common;

use common::config;
use hearth_image::base::Base;
use hearth_proto::exec::ExecRequest;
use hearth_vmm::jail::{Hierarchy, JailConfig, Limits, Unavailable};
use hearth_vmm::{Accel, Vm};
use std::path::Path;
use std::time::Duration;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: the jail needs root");
    }
    root
}

async fn boot_jailed(jail: JailConfig, memory_mib: u32) -> Vm {
    let mut cfg = config(Base::Busybox);
    cfg.jail = Some(jail);
    cfg.memory_mib = memory_mib;
    Vm::boot(cfg).await.unwrap_or_else(|e| panic!("jailed boot failed: {e}"))
}

fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or_else(|| panic!("no {name} in status")).trim().to_owned()
}

/// QEMU's cgroup directory under `controller` (from /proc/PID/cgroup).
fn cgroup_dir(pid: u32, controller: &str) -> std::path::PathBuf {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = s
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            ctl.split(',').any(|c| c == controller).then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("QEMU is in no {controller} cgroup: {s}"));
    Path::new("/sys/fs/cgroup").join(controller).join(path.trim_start_matches('/'))
}

fn read_num(p: &Path) -> u64 {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().parse().unwrap()
}

/// Runs `script` with sh inside QEMU's mount and PID namespaces as `uid`; (status, output).
fn inside(pid: u32, uid: Option<u32>, script: &str) -> (bool, String) {
    let mut c = std::process::Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-m", "-p"]);
    if let Some(u) = uid {
        c.args(["-S", &u.to_string(), "-G", &u.to_string()]);
    }
    let out = c.args(["/usr/bin/sh", "-c", script]).output().expect("nsenter");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_qemu_is_unprivileged_limited_and_sees_only_its_files() {
    if !root() {
        return;
    }
    let jail = JailConfig::default();
    let a = boot_jailed(jail.clone(), 512).await;
    let b = boot_jailed(jail.clone(), 512).await;
    let pid = a.pid();
    // The pid kept is QEMU's own host pid (what reattach checks).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(a.id()), "pid {pid} is not this VM's QEMU");

    // The kernel's view of the process.
    let uids: Vec<u32> = status_field(pid, "Uid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    let uid = uids[0];
    assert!(uids.iter().all(|u| *u == uid), "real, effective, saved and fs uid differ: {uids:?}");
    assert!((jail.uid_base..jail.uid_base + jail.uid_count).contains(&uid), "uid {uid} outside the jail's range");
    let gids: Vec<u32> = status_field(pid, "Gid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(gids.iter().all(|g| *g == uid), "gids {gids:?}");
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // Its own uid, not the other VM's.
    let other_uid: u32 = status_field(b.pid(), "Uid").split_whitespace().next().unwrap().parse().unwrap();
    assert_ne!(uid, other_uid);
    // NSpid: QEMU is PID 1 of its own namespace.
    assert_eq!(status_field(pid, "NSpid").split_whitespace().last(), Some("1"));

    // Its cgroups, sized from the VM.
    let want = Limits::for_vm(512, 1, a.accel() != Accel::Kvm, None);
    let mem = cgroup_dir(pid, "memory");
    assert!(mem.ends_with(format!("hearth/{uid}")), "{}", mem.display());
    assert_eq!(read_num(&mem.join("memory.limit_in_bytes")), want.memory_bytes);
    assert_eq!(read_num(&cgroup_dir(pid, "pids").join("pids.max")), want.pids);
    assert_eq!(read_num(&cgroup_dir(pid, "cpu").join("cpu.cfs_quota_us")), want.cpu_quota_us);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = |name: &str| limits.lines().find(|l| l.starts_with(name)).unwrap().split_whitespace().rev().nth(1).unwrap().to_owned();
    assert_eq!(line("Max core file size"), "0");
    assert_eq!(line("Max open files"), hearth_vmm::jail::DEFAULT_NOFILE.to_string());

    // Inside its namespaces: none of the host's secrets, the other VM or the state.
    let home = hearth_vmm::home::hearth_home();
    let a_dir = a.run_dir().to_path_buf();
    let b_dir = b.run_dir().to_path_buf();
    let kernel = config(Base::Busybox).kernel;
    for who in [None, Some(uid)] {
        let script = format!(
            "test -e /etc/shadow && echo SHADOW; test -e {b} && echo OTHER-VM; test -e {home}/accel.json && echo STATE; \
             test -e {home}/api && echo DAEMON; test -e {a}/vm.json && echo RECORD; test -e /dev/net/tun && echo TUN; \
             test -e {a}/q/qmp.sock || echo NO-OWN-SOCKET; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
            b = b_dir.display(),
            a = a_dir.display(),
            home = home.display()
        );
        let (ok, out) = inside(pid, who, &script);
        assert!(ok || !out.is_empty(), "nsenter failed: {out}");
        for leak in ["SHADOW", "OTHER-VM", "STATE", "DAEMON", "RECORD", "TUN", "NO-OWN-SOCKET"] {
            assert!(!out.contains(leak), "{leak} visible in the jail (as {who:?}): {out}");
        }
        assert!(out.contains("qemu-system"), "PID 1 of the namespace is not QEMU: {out}");
    }
    // As the jail's uid: the read-only files cannot be written, the host's files are not
    // there to read, and the other VM's files stay out of reach even by a path that exists.
    let (ok, out) = inside(pid, Some(uid), &format!("echo x >> {}", kernel.display()));
    assert!(!ok, "the kernel image is writable in the jail: {out}");
    let (ok, _) = inside(pid, Some(uid), "cat /etc/passwd");
    assert!(!ok, "/etc/passwd is readable in the jail");
    let (ok, _) = inside(pid, Some(uid), &format!("touch {}/q/escape", b_dir.display()));
    assert!(!ok);
    drop(a);
    drop(b);
    // The groups go with the VMs.
    let gone = async {
        while mem.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the VM's cgroup outlived it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_touching_more_than_its_cgroup_allows_gets_qemu_killed_not_the_host() {
    if !root() {
        return;
    }
    const LIMIT_MIB: u64 = 300;
    let vm = boot_jailed(JailConfig { memory_limit_mib: Some(LIMIT_MIB), ..JailConfig::default() }, 768).await;
    let pid = vm.pid();
    let mem = cgroup_dir(pid, "memory");
    assert_eq!(read_num(&mem.join("memory.limit_in_bytes")), LIMIT_MIB << 20);
    let avail = || {
        let m = std::fs::read_to_string("/proc/meminfo").unwrap();
        m.lines().find_map(|l| l.strip_prefix("MemAvailable:")).unwrap().trim().trim_end_matches(" kB").parse::<u64>().unwrap()
    };
    let before = avail();
    // 600 MiB of guest RAM touched (a tmpfs filled from /dev/zero): fits the guest, not
    // the cgroup.
    let script = "mkdir -p /m && mount -t tmpfs -o size=700m none /m && dd if=/dev/zero of=/m/fill bs=1M count=600 && echo FILLED";
    let r = tokio::time::timeout(Duration::from_secs(300), vm.exec(&ExecRequest::shell(script), None, 1 << 20)).await;
    let out = match &r {
        Ok(Ok(o)) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    };
    let peak = read_num(&mem.join("memory.max_usage_in_bytes"));
    let oom_kills = std::fs::read_to_string(mem.join("memory.oom_control")).unwrap();
    assert!(peak <= LIMIT_MIB << 20, "QEMU grew past its limit: {peak}");
    assert!(peak + (16 << 20) >= LIMIT_MIB << 20, "the limit was never reached (peak {peak}): {out}");
    // What happened: QEMU, the only task of its group, is killed by the group's OOM killer.
    let status = tokio::time::timeout(Duration::from_secs(10), vm.exit_watch().exited()).await.ok().flatten();
    assert!(!out.contains("FILLED"), "the guest filled 600 MiB under a {LIMIT_MIB} MiB limit: {out}");
    assert!(status.is_some(), "QEMU survived ({out}); oom_control: {oom_kills}");
    assert!(!vm.is_running());
    eprintln!("QEMU ended with {status:?} after {out:?}; oom_control: {oom_kills}");
    assert!(oom_kills.contains("oom_kill ") && !oom_kills.contains("oom_kill 0"), "{oom_kills}");
    // The host is fine: this process runs, and memory came back.
    assert!(avail() + (64 << 10) >= before.saturating_sub(LIMIT_MIB << 10), "host memory did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cgroup_v2_tree_without_controllers_refuses_to_jail_naming_them() {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !root() {
        return;
    }
    let Hierarchy::V2 { .. } = Hierarchy::at(unified) else {
        eprintln!("skipped: no cgroup2 mount at {}", unified.display());
        return;
    };
    let e = match hearth_vmm::jail::available(unified) {
        Ok(_) => {
            eprintln!("skipped: {} has the controllers (a v2 host): nothing to refuse", unified.display());
            return;
        }
        Err(e) => e,
    };
    let Unavailable::V2Missing { missing, .. } = &e else { panic!("{e}") };
    assert!(!missing.is_empty());
    let msg = e.to_string();
    assert!(msg.contains(&missing.join(", ")) && msg.contains("--no-jail"), "{msg}");
    // The VM is refused before anything is made for it: no group, no QEMU.
    let before: Vec<_> = std::fs::read_dir(unified.join("hearth")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    let mut cfg = config(Base::Busybox);
    cfg.jail = Some(JailConfig { cgroup_root: unified.to_path_buf(), ..JailConfig::default() });
    let err = match Vm::boot(cfg).await {
        Ok(_) => panic!("jailed without the memory, cpu and pids controllers"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains(&msg), "the boot error does not say why: {err}");
    let after: Vec<_> = std::fs::read_dir(unified.join("hearth")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert_eq!(before, after, "a refused VM left a group");
}
