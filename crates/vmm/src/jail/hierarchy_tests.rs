//! [`Hierarchy`]'s files and layout, and a real v2 tree where the host has one.

use super::*;
use crate::jail::cgroup::{self, Cgroup, PIDS_BASE, QEMU_OVERHEAD_MIB, TCG_TB_MIB};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

fn files(h: &Hierarchy, limits: Limits) -> BTreeMap<&'static str, String> {
    h.settings(limits).into_iter().map(|s| (s.file, s.value)).collect()
}

#[test]
fn v1_and_v2_write_the_same_limits_under_their_own_names() {
    let limits = Limits::for_vm(512, 2, true, None);
    let mem = ((512 + QEMU_OVERHEAD_MIB + TCG_TB_MIB) << 20).to_string();
    let pids = (PIDS_BASE + 2).to_string();
    let v1 = files(&Hierarchy::V1 { root: "/c".into() }, limits);
    let want_v1 = BTreeMap::from([
        ("memory.limit_in_bytes", mem.clone()),
        ("memory.memsw.limit_in_bytes", mem.clone()),
        ("cpu.cfs_period_us", "100000".to_owned()),
        ("cpu.cfs_quota_us", "300000".to_owned()),
        ("pids.max", pids.clone()),
    ]);
    assert_eq!(v1, want_v1);
    let v2 = files(&Hierarchy::V2 { root: "/c".into() }, limits);
    let want_v2 = BTreeMap::from([
        ("memory.max", mem),
        ("memory.swap.max", "0".to_owned()),
        ("cpu.max", "300000 100000".to_owned()),
        ("pids.max", pids),
    ]);
    assert_eq!(v2, want_v2);
    // Both from one sizing: v2's cpu.max is v1's quota and period, memory.max v1's limit.
    assert_eq!(v2["cpu.max"], format!("{} {}", v1["cpu.cfs_quota_us"], v1["cpu.cfs_period_us"]));
    assert_eq!(v2["memory.max"], v1["memory.limit_in_bytes"]);
    // An override and a KVM guest size both alike.
    for l in [Limits::for_vm(256, 1, false, None), Limits::for_vm(4096, 8, true, Some(300))] {
        let (v1, v2) = (files(&Hierarchy::V1 { root: "/c".into() }, l), files(&Hierarchy::V2 { root: "/c".into() }, l));
        assert_eq!(v2["memory.max"], v1["memory.limit_in_bytes"]);
        assert_eq!(v2["pids.max"], v1["pids.max"]);
        assert_eq!(v2["cpu.max"], format!("{} {}", l.cpu_quota_us, CFS_PERIOD_US));
    }
    // Only the swap files may be missing; v1 writes memsw after the limit (the kernel
    // refuses memsw below it).
    let order: Vec<_> = Hierarchy::V1 { root: "/c".into() }.settings(limits).into_iter().map(|s| (s.file, s.optional)).collect();
    assert_eq!(order[..2], [("memory.limit_in_bytes", false), ("memory.memsw.limit_in_bytes", true)]);
    let optional: Vec<_> =
        Hierarchy::V2 { root: "/c".into() }.settings(limits).into_iter().filter(|s| s.optional).map(|s| s.file).collect();
    assert_eq!(optional, ["memory.swap.max"]);
}

#[test]
fn v1_has_a_group_per_controller_and_v2_one() {
    let v1 = Hierarchy::V1 { root: "/c".into() };
    let dirs: Vec<PathBuf> = ["memory", "cpu", "pids"].iter().map(|c| PathBuf::from(format!("/c/{c}/hearth/7"))).collect();
    assert_eq!(v1.groups(7), dirs);
    assert_eq!(v1.group("cpu", 7), PathBuf::from("/c/cpu/hearth/7"));
    assert_eq!(v1.lock_parent(), PathBuf::from("/c/memory/hearth"));
    let v2 = Hierarchy::V2 { root: "/c".into() };
    assert_eq!(v2.groups(7), [PathBuf::from("/c/hearth/7")]);
    for c in CONTROLLERS {
        assert_eq!(v2.group(c, 7), PathBuf::from("/c/hearth/7"));
    }
    assert_eq!(v2.lock_parent(), PathBuf::from("/c/hearth"));
    assert_eq!((v1.version(), v2.version()), (1, 2));
}

#[test]
fn a_directory_that_is_no_cgroup2_mount_is_read_as_v1() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(Hierarchy::at(d.path()), Hierarchy::V1 { root: d.path().to_path_buf() });
}

#[test]
fn v2_names_every_missing_controller_and_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("cgroup.controllers"), "cpuset cpu io\n").unwrap();
    let h = Hierarchy::V2 { root: d.path().to_path_buf() };
    let e = h.check().unwrap_err();
    assert_eq!(
        e,
        Unavailable::V2Missing {
            root: d.path().to_path_buf(),
            missing: vec!["memory", "pids"],
            listed: vec!["cpuset".into(), "cpu".into(), "io".into()]
        }
    );
    let msg = e.to_string();
    for w in ["cgroup v2 controllers memory, pids", "lists cpuset, cpu, io", "--no-jail", "systemd.unified_cgroup_hierarchy=1"] {
        assert!(msg.contains(w), "{w:?} not in {msg}");
    }
    std::fs::write(d.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n").unwrap();
    assert_eq!(h.check(), Ok(()));
}

#[test]
fn v2_enables_offered_controllers_down_to_hearth_once() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
    std::fs::write(d.path().join("cgroup.subtree_control"), "").unwrap();
    let h = Hierarchy::V2 { root: d.path().to_path_buf() };
    h.prepare().unwrap();
    assert_eq!(std::fs::read_to_string(d.path().join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");
    // `hearth` (a plain directory here) offers nothing yet: nothing written.
    assert!(d.path().join("hearth").is_dir());
    assert!(!d.path().join("hearth/cgroup.subtree_control").exists());
    // Already enabled: left alone (a write would only repeat it).
    std::fs::write(d.path().join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
    h.prepare().unwrap();
    assert_eq!(std::fs::read_to_string(d.path().join("cgroup.subtree_control")).unwrap(), "cpu memory pids\n");
}

/// The host's cgroup2 mount, where there is one (a hybrid host's `unified`, or a v2 host's root).
fn v2_mount() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: cgroups need root");
        return None;
    }
    let m = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"].into_iter().map(PathBuf::from).find(|p| is_cgroup2(p));
    if m.is_none() {
        eprintln!("skipped: no cgroup2 mount");
    }
    m
}

/// The tests on the real tree take turns: each removes `hearth` when done, which the
/// other's claim needs.
static REAL_TREE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A `sleep` killed when dropped.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A uid no daemon hands out (above the default range) and no other test run takes.
fn test_uid() -> u32 {
    4_000_000_000 + std::process::id() % 100_000_000
}

#[test]
fn a_real_v2_tree_gets_the_group_the_process_and_the_refusal_then_loses_the_group() {
    let Some(mount) = v2_mount() else { return };
    let _turn = REAL_TREE.lock().unwrap_or_else(|p| p.into_inner());
    let h = Hierarchy::at(&mount);
    assert_eq!(h, Hierarchy::V2 { root: mount.clone() });
    h.prepare().unwrap();
    let uid = test_uid();
    let mut cg = Cgroup::claim(&h, uid).unwrap().expect("a fresh uid");
    let dir = mount.join("hearth").join(uid.to_string());
    assert!(dir.is_dir());
    // The uid is taken now: a second claim (another daemon's) gets none.
    assert!(Cgroup::claim(&h, uid).unwrap().is_none());

    // A real process joins through the group's cgroup.procs, as QEMU's child does.
    let sleeper = Sleeper(std::process::Command::new("sleep").arg("30").spawn().unwrap());
    let pid = sleeper.0.id();
    let procs = cg.procs_files().unwrap();
    assert_eq!(procs.len(), 1, "v2 has one group");
    let mut f = std::fs::File::from(procs.into_iter().next().unwrap());
    std::io::Write::write_all(&mut f, pid.to_string().as_bytes()).unwrap();
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(member.lines().any(|l| l == format!("0::/hearth/{uid}")), "{member}");
    assert_eq!(std::fs::read_to_string(dir.join("cgroup.procs")).unwrap().trim(), pid.to_string());

    let limits = Limits::for_vm(512, 2, true, None);
    match h.check() {
        // This host: a controller-less v2 (hybrid): refused, naming each missing one.
        Err(e) => {
            let Unavailable::V2Missing { missing, .. } = &e else { panic!("{e}") };
            let listed = words(&mount.join("cgroup.controllers"));
            let want: Vec<_> = CONTROLLERS.into_iter().filter(|c| !listed.iter().any(|l| l == c)).collect();
            assert_eq!(missing, &want);
            let msg = e.to_string();
            assert!(msg.contains(&want.join(", ")) && msg.contains("--no-jail") && msg.contains("enable them"), "{msg}");
            assert_eq!(crate::jail::available(&mount).unwrap_err(), e);
            assert!(cg.configure(limits).is_err(), "limits written without their controllers");
        }
        // A v2 host with the controllers: the limits land in the group's files.
        Ok(()) => {
            cg.configure(limits).unwrap();
            for s in h.settings(limits) {
                if let Ok(got) = std::fs::read_to_string(dir.join(s.file)) {
                    assert_eq!(got.trim(), s.value, "{}", s.file);
                }
            }
        }
    }

    drop(sleeper);
    drop(cg);
    assert!(!dir.exists(), "the group outlived its process");
    let _ = std::fs::remove_dir(mount.join("hearth"));
}

#[test]
fn a_real_v2_tree_sweeps_old_empty_groups_and_keeps_young_ones() {
    let Some(mount) = v2_mount() else { return };
    let _turn = REAL_TREE.lock().unwrap_or_else(|p| p.into_inner());
    let h = Hierarchy::at(&mount);
    h.prepare().unwrap();
    let (old_uid, young_uid) = (test_uid() + 100_000_000, test_uid() + 200_000_000);
    let old = Cgroup::claim(&h, old_uid).unwrap().expect("a fresh uid");
    let young = Cgroup::claim(&h, young_uid).unwrap().expect("a fresh uid");
    // A crash left them (no Drop); the old one was made two minutes ago.
    old.release();
    young.release();
    let (old_dir, young_dir) = (h.group("memory", old_uid), h.group("memory", young_uid));
    std::fs::File::open(&old_dir).unwrap().set_modified(SystemTime::now() - Duration::from_secs(120)).unwrap();
    cgroup::sweep_empty(&h);
    assert!(!old_dir.exists(), "an old empty group was kept");
    assert!(young_dir.exists(), "a young group (a VM starting) was swept");
    cgroup::remove(vec![young_dir.clone()]);
    assert!(!young_dir.exists());
    let _ = std::fs::remove_dir(mount.join("hearth"));
}
