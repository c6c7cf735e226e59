//! What the host can hold: memory, vCPUs and disk for every tenant's microvms and builds
//! together. RunMicrovm is refused with the model's InsufficientCapacityException (or idle
//! microvms are suspended first, when the operator enables it) rather than overcommitting
//! the host into the OOM killer; the host's reserve of memory and disk stays the
//! operator's.
//!
//! Memory is counted at each VM's full size plus QEMU's own overhead, times the operator's
//! overcommit ratio (1 by default: no overcommit). Clones of a template share its pages,
//! so a host often holds more; `--memory-overcommit` lets the operator bet on that.

use crate::error::ApiError;
use std::path::Path;

/// QEMU's own memory per VM beyond the guest's (device model, translation cache under TCG),
/// counted against the host.
pub const VM_OVERHEAD_MIB: u64 = 96;

/// The operator's settings (`hearth serve --memory-overcommit`, `--cpu-overcommit`,
/// `--reserve-memory-mib`, `--reserve-disk-mib`, `--reclaim-idle`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Guest memory the host may promise per byte it has (after the reserve).
    pub memory_overcommit: f64,
    /// vCPUs the host may run per CPU it has.
    pub cpu_overcommit: f64,
    /// Memory kept for the host itself (MiB); `None`: 10% of it, at least 1 GiB.
    pub reserve_memory_mib: Option<u64>,
    /// Disk kept free on the state directory's filesystem (MiB); `None`: 2% of it,
    /// between 1 and 4 GiB.
    pub reserve_disk_mib: Option<u64>,
    /// Suspend the longest-idle running microvms (idle this long at least) to make room,
    /// rather than refuse.
    pub reclaim_idle: Option<std::time::Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { memory_overcommit: 1.0, cpu_overcommit: 16.0, reserve_memory_mib: None, reserve_disk_mib: None, reclaim_idle: None }
    }
}

/// The host's limits, measured once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// Memory (MiB) VMs may hold together, overhead included.
    pub memory_mib: u64,
    /// vCPUs VMs may hold together.
    pub vcpus: u64,
    /// Free disk (bytes) that must remain on the state filesystem.
    pub disk_reserve: u64,
    /// Suspend microvms idle this long to make room.
    pub reclaim_idle: Option<std::time::Duration>,
}

/// What VMs hold now, all tenants together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Memory (MiB), overhead included.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
}

impl Load {
    /// Adds one VM of `memory_mib` and `vcpus`.
    pub fn add(&mut self, memory_mib: u64, vcpus: u64) {
        self.memory_mib += memory_mib + VM_OVERHEAD_MIB;
        self.vcpus += vcpus;
    }
}

/// What is missing for one more VM: memory (MiB) and vCPUs beyond the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Memory (MiB) over.
    pub memory_mib: u64,
    /// vCPUs over.
    pub vcpus: u64,
}

impl Capacity {
    /// The host's capacity under `s`, measured from `/proc/meminfo` (or the daemon's memory
    /// cgroup, when it allows less), the CPUs it may run on, and the state filesystem.
    pub fn measure(s: &Settings, state: &Path) -> Capacity {
        let total = host_memory_mib();
        let reserve = s.reserve_memory_mib.unwrap_or_else(|| (total / 10).max(1024));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let disk = disk_total(state);
        // 2% of the filesystem, between 1 and 4 GiB: ext4 already keeps 5% from unprivileged
        // writers (and `disk_free` counts only what they may use), so a larger share would
        // refuse work on a big disk with gigabytes free.
        let disk_reserve = s.reserve_disk_mib.map_or_else(|| (disk / 50).clamp(1 << 30, 4 << 30), |m| m << 20);
        Capacity {
            memory_mib: ((total.saturating_sub(reserve)) as f64 * s.memory_overcommit.max(0.0)) as u64,
            vcpus: ((cpus as f64) * s.cpu_overcommit.max(0.0)).floor() as u64,
            disk_reserve,
            reclaim_idle: s.reclaim_idle,
        }
    }

    /// What one more VM of `memory_mib` and `vcpus` lacks on top of `load`; `None` when it
    /// fits.
    pub fn shortfall(&self, load: Load, memory_mib: u64, vcpus: u64) -> Option<Shortfall> {
        let mut after = load;
        after.add(memory_mib, vcpus);
        let s = Shortfall { memory_mib: after.memory_mib.saturating_sub(self.memory_mib), vcpus: after.vcpus.saturating_sub(self.vcpus) };
        (s.memory_mib > 0 || s.vcpus > 0).then_some(s)
    }

    /// The InsufficientCapacityException for a VM that does not fit.
    pub fn refusal(&self, load: Load, memory_mib: u64, vcpus: u64) -> ApiError {
        ApiError::capacity(format!(
            "this host cannot hold another microvm of {memory_mib} MiB and {vcpus} vCPU now: its microvms hold {} of {} MiB and {} of {} vCPUs; \
             try again after others are suspended or terminated",
            load.memory_mib, self.memory_mib, load.vcpus, self.vcpus
        ))
    }

    /// Refuses work that would leave less than the reserve free on `state`'s filesystem
    /// after writing `bytes` more.
    ///
    /// # Errors
    ///
    /// InternalServerException with `Retry-After` (the model's shape for the operations
    /// that have no capacity error), naming the shortfall.
    pub fn check_disk(&self, state: &Path, bytes: u64) -> Result<(), ApiError> {
        let free = disk_free(state);
        if free >= self.disk_reserve.saturating_add(bytes) {
            return Ok(());
        }
        Err(ApiError::unavailable(
            format!(
                "this host is short of disk: {} MiB free, {} MiB kept in reserve, {} MiB asked; try again later",
                free >> 20,
                self.disk_reserve >> 20,
                bytes.div_ceil(1 << 20)
            ),
            60,
        ))
    }
}

/// The host's memory (MiB): `/proc/meminfo`'s MemTotal, or the daemon's memory cgroup
/// limit where that is lower.
pub fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let mut mib = total_kib / 1024;
    if let Some(limit) = cgroup_memory_limit() {
        mib = mib.min(limit >> 20);
    }
    mib
}

/// The memory limit of this process's cgroup (v1 `memory.limit_in_bytes` or v2
/// `memory.max`), when it has one.
fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            continue;
        };
        if let Some(n) = std::fs::read_to_string(file).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            return Some(n);
        }
    }
    None
}

fn statvfs(p: &Path) -> Option<rustix::fs::StatVfs> {
    rustix::fs::statvfs(p).ok()
}

/// Bytes free (to unprivileged users) on `p`'s filesystem.
pub fn disk_free(p: &Path) -> u64 {
    statvfs(p).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

fn disk_total(p: &Path) -> u64 {
    statvfs(p).map_or(0, |s| s.f_blocks.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_fits_until_memory_or_vcpus_run_out() {
        let c = Capacity { memory_mib: 2048, vcpus: 4, disk_reserve: 0, reclaim_idle: None };
        let mut load = Load::default();
        for _ in 0..3 {
            assert!(c.shortfall(load, 512, 1).is_none());
            load.add(512, 1);
        }
        // 3 × (512 + 96) = 1824 MiB held; one more is 2432 > 2048.
        let s = c.shortfall(load, 512, 1).unwrap();
        assert_eq!(s, Shortfall { memory_mib: 384, vcpus: 0 });
        let e = c.refusal(load, 512, 1);
        assert_eq!(e.kind, crate::error::Kind::InsufficientCapacity);
        assert_eq!(e.status(), 500);
        assert!(e.message.contains("1824 of 2048 MiB"), "{}", e.message);
        let cpus = Capacity { memory_mib: 1 << 20, vcpus: 2, disk_reserve: 0, reclaim_idle: None };
        assert_eq!(cpus.shortfall(Load { memory_mib: 0, vcpus: 2 }, 512, 1), Some(Shortfall { memory_mib: 0, vcpus: 1 }));
    }

    #[test]
    fn measured_from_the_host_with_its_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let c = Capacity::measure(&Settings::default(), dir.path());
        let total = host_memory_mib();
        assert!(total > 0);
        assert!(c.memory_mib < total && c.memory_mib + 1024 <= total, "{c:?} of {total}");
        assert!(c.vcpus >= 16);
        assert!((1 << 30..=4 << 30).contains(&c.disk_reserve), "{c:?}");
        let none = Capacity::measure(&Settings { memory_overcommit: 0.0, reserve_disk_mib: Some(1), ..Settings::default() }, dir.path());
        assert_eq!(none.memory_mib, 0);
        assert_eq!(none.disk_reserve, 1 << 20);
        // The disk check: nothing asked passes with a tiny reserve; more than the disk has
        // is refused with a Retry-After.
        assert!(none.check_disk(dir.path(), 0).is_ok());
        let e = none.check_disk(dir.path(), u64::MAX / 2).unwrap_err();
        assert_eq!(e.retry_after, Some(60));
        assert!(e.message.contains("short of disk"), "{}", e.message);
    }
}
