//! A jailed QEMU's cgroups: `hearth/<uid>` in the v1 `memory`, `cpu` and `pids`
//! controllers, or one `hearth/<uid>` group of a v2 tree ([`Hierarchy`] says which and
//! where), with the limits sized from the VM ([`Limits`]).
//!
//! The group is named after the jail's uid, and creating it (v1: the `memory` one)
//! allocates the uid: `mkdir` fails when the name exists, so two processes (two daemons,
//! the CLI and a daemon) never hand out the same uid, without a lock file. The group is
//! removed when the VM goes (the directory can only be removed once QEMU is reaped, so
//! removal is retried briefly), and with the run directory a crash left behind.

use super::hierarchy::Hierarchy;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// QEMU's own memory beside guest RAM under TCG: the translation cache (capped with
/// `tb-size`, [`TCG_TB_MIB`]) plus [`QEMU_OVERHEAD_MIB`].
pub const TCG_TB_MIB: u64 = 256;
/// QEMU's memory beside guest RAM and the TCG cache: heap, qcow2 L2/refcount caches
/// (1 MiB per disk), thread stacks (8 MiB reserved each, a few hundred KiB touched),
/// migration buffers (multifd: 4 channels × a few MiB) and the page cache a capture
/// charges to the group (reclaimed under pressure, never the reason for an OOM).
/// A TCG guest with 512 MiB measured ~90 MiB of QEMU RSS beyond guest RAM after boot.
pub const QEMU_OVERHEAD_MIB: u64 = 192;
/// Tasks (QEMU's threads) beside one per vCPU: main loop, RCU, the block layer's
/// worker pool (up to 64), migration and 4 multifd threads, I/O threads.
pub const PIDS_BASE: u64 = 128;
/// CFS period for the CPU quota.
pub const CFS_PERIOD_US: u64 = 100_000;

/// The limits of one VM's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// v1 `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` where swap is
    /// accounted), v2 `memory.max` (and `memory.swap.max` 0).
    pub memory_bytes: u64,
    /// `pids.max` (both).
    pub pids: u64,
    /// v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`, v2 `cpu.max`'s quota; the period
    /// is [`CFS_PERIOD_US`].
    pub cpu_quota_us: u64,
}

impl Limits {
    /// Sized from the VM: guest RAM plus QEMU's overhead (plus the translation cache
    /// under TCG), a task per vCPU plus [`PIDS_BASE`], one CPU per vCPU plus one for
    /// QEMU's main loop and I/O.
    pub fn for_vm(memory_mib: u32, vcpus: u32, tcg: bool, memory_override_mib: Option<u64>) -> Limits {
        let mib = memory_override_mib.unwrap_or(u64::from(memory_mib) + QEMU_OVERHEAD_MIB + if tcg { TCG_TB_MIB } else { 0 });
        Limits { memory_bytes: mib << 20, pids: PIDS_BASE + u64::from(vcpus), cpu_quota_us: (u64::from(vcpus) + 1) * CFS_PERIOD_US }
    }
}

/// One VM's groups, removed when dropped.
#[derive(Debug)]
pub(crate) struct Cgroup {
    hierarchy: Hierarchy,
    uid: u32,
    /// Created so far, the uid's lock first.
    dirs: Vec<PathBuf>,
}

/// Writes `value` to `dir/file`; the error names the file.
pub(crate) fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

impl Cgroup {
    /// Creates `uid`'s first group ([`Hierarchy::groups`]; the parents exist:
    /// [`Hierarchy::prepare`]), or `Ok(None)` when that uid is taken (the group exists).
    pub(crate) fn claim(hierarchy: &Hierarchy, uid: u32) -> std::io::Result<Option<Cgroup>> {
        let lock = hierarchy.groups(uid).swap_remove(0);
        match std::fs::create_dir(&lock) {
            Ok(()) => Ok(Some(Cgroup { hierarchy: hierarchy.clone(), uid, dirs: vec![lock] })),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("{}: {e}", lock.display()))),
        }
    }

    /// Creates the other groups (v1: `cpu`, `pids`) and writes `limits`
    /// ([`Hierarchy::settings`]).
    pub(crate) fn configure(&mut self, limits: Limits) -> std::io::Result<()> {
        for d in self.hierarchy.groups(self.uid).into_iter().skip(1) {
            std::fs::create_dir_all(&d)?;
            self.dirs.push(d);
        }
        for s in self.hierarchy.settings(limits) {
            let dir = self.hierarchy.group(s.controller, self.uid);
            if s.optional && !dir.join(s.file).exists() {
                continue;
            }
            write(&dir, s.file, &s.value)?;
        }
        Ok(())
    }

    /// The groups' `cgroup.procs`, opened for the child to write `0` (itself) into.
    pub(crate) fn procs_files(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs.iter().map(|d| std::fs::OpenOptions::new().write(true).open(d.join("cgroup.procs")).map(OwnedFd::from)).collect()
    }

    /// Takes back the groups of `uid` under `root` (a reattached VM's).
    pub(crate) fn adopt(root: &Path, uid: u32) -> Cgroup {
        let hierarchy = Hierarchy::at(root);
        let dirs = hierarchy.groups(uid).into_iter().filter(|d| d.is_dir()).collect();
        Cgroup { hierarchy, uid, dirs }
    }

    /// Leaves the groups in place (their VM runs on, detached).
    pub(crate) fn release(mut self) {
        self.dirs.clear();
    }
}

/// Removes empty groups older than a minute: those of VMs killed while no Hearth process
/// held them (their run directory gone too, so no sweep finds them). A group is joined
/// milliseconds after it is created, so an old empty one belongs to no starting VM.
pub(crate) fn sweep_empty(hierarchy: &Hierarchy) {
    for e in std::fs::read_dir(hierarchy.lock_parent()).into_iter().flatten().flatten() {
        let Some(uid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > Duration::from_secs(60)));
        let empty = std::fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if old && empty {
            // The uid's lock last.
            for d in hierarchy.groups(uid).iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Removes the groups, retrying for a few seconds on a thread while QEMU is reaped.
pub(crate) fn remove(dirs: Vec<PathBuf>) {
    let try_all = |dirs: &mut Vec<PathBuf>| dirs.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
    let mut dirs = dirs;
    try_all(&mut dirs);
    if dirs.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(100));
            try_all(&mut dirs);
            if dirs.is_empty() {
                return;
            }
        }
    });
}

impl Drop for Cgroup {
    /// The VM drops QEMU (SIGKILL through its pidfd) just before: a group empties as soon
    /// as QEMU has died (a zombie is no longer a member), which takes a few milliseconds
    /// to a few tens (unmapping guest RAM). Waiting up to 500 ms here, rather than only on
    /// a thread, means a process that exits right after dropping its VMs leaves no group.
    fn drop(&mut self) {
        let mut dirs = std::mem::take(&mut self.dirs);
        // The uid's lock last.
        dirs.reverse();
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        loop {
            dirs.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
            if dirs.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        remove(dirs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cover_guest_ram_and_qemu() {
        let l = Limits::for_vm(512, 2, true, None);
        assert_eq!(l.memory_bytes, (512 + QEMU_OVERHEAD_MIB + TCG_TB_MIB) << 20);
        assert_eq!(l.pids, PIDS_BASE + 2);
        assert_eq!(l.cpu_quota_us, 300_000);
        assert_eq!(Limits::for_vm(512, 1, false, None).memory_bytes, (512 + QEMU_OVERHEAD_MIB) << 20);
        assert_eq!(Limits::for_vm(512, 1, true, Some(200)).memory_bytes, 200 << 20);
    }
}
