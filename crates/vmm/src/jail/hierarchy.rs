//! Which cgroup hierarchy a host has, and where a jail's groups and limit files live in it.
//!
//! - **v1** ([`Hierarchy::V1`]): a mount per controller (`<root>/memory`, `/cpu`, `/pids`).
//!   A VM's group is `hearth/<uid>` in each of the three, each with its own limit files.
//! - **v2** ([`Hierarchy::V2`], `<root>` is a `cgroup2` mount, told by `statfs`'s
//!   `CGROUP2_SUPER_MAGIC`): one tree, one group per VM, `<root>/hearth/<uid>`. A
//!   controller's files appear in a group only when its parent enables the controller in
//!   `cgroup.subtree_control`, which the parent may only do once *its* parent has, so the
//!   jail enables `memory`, `cpu` and `pids` in `<root>` and then in `<root>/hearth`
//!   (`Hierarchy::prepare`). v2's "no internal processes" rule (a group that enables
//!   controllers for its children holds no process itself; the root is exempt) is kept by
//!   the layout: `hearth` holds only groups, and each VM's group is a leaf holding only its
//!   QEMU. Where `<root>` is not the real root (inside a cgroup namespace) and holds
//!   processes, the kernel refuses with `EBUSY` and the error says so.
//!
//! Which one a host has is read once from the mount ([`Hierarchy::at`]); every path and
//! file name below comes from the enum, so the rest of the jail never asks "v1 or v2?".
//! The same [`Limits`] become either hierarchy's files ([`Hierarchy::settings`]):
//!
//! | limit  | v1                                                      | v2                      |
//! |--------|---------------------------------------------------------|-------------------------|
//! | memory | `memory.limit_in_bytes`                                 | `memory.max`            |
//! | swap   | `memory.memsw.limit_in_bytes` = memory (no swap beyond) | `memory.swap.max` = 0   |
//! | cpu    | `cpu.cfs_quota_us` over `cpu.cfs_period_us`             | `cpu.max` = "quota period" |
//! | tasks  | `pids.max`                                              | `pids.max`              |
//!
//! The swap files exist only where the kernel accounts swap; elsewhere they are skipped.

use super::cgroup::{Limits, CFS_PERIOD_US};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The controllers a jail uses; `memory` first (in v1 its group allocates the uid).
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The group under which every VM's group is created.
pub const PARENT: &str = "hearth";

/// A host's cgroup hierarchy, rooted where the jail was told ([`super::JailConfig::cgroup_root`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1: the controllers are mounted at `<root>/<controller>`.
    V1 {
        /// Where the controllers' mounts are (`/sys/fs/cgroup`).
        root: PathBuf,
    },
    /// cgroup v2: `root` is a `cgroup2` mount (or any group of one, e.g. a delegated one).
    V2 {
        /// The group under which `hearth/` is made.
        root: PathBuf,
    },
}

/// One limit file of a VM's group and the value written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The controller it belongs to (in v1, which group directory holds it).
    pub controller: &'static str,
    /// The file's name.
    pub file: &'static str,
    /// What is written.
    pub value: String,
    /// Skipped where the kernel has no such file (swap accounting is optional).
    pub optional: bool,
}

/// Why this host cannot jail QEMU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The process is not root.
    #[error("the jail needs root; run Hearth as root, or run with --no-jail")]
    NotRoot,
    /// A v1 controller is not mounted.
    #[error(
        "the jail needs the cgroup v1 {controller} controller at {} (or a cgroup v2 mount at {} whose cgroup.controllers lists memory, cpu and pids); mount it, or run with --no-jail",
        root.join(controller).display(),
        root.display()
    )]
    V1Missing {
        /// The controller not found.
        controller: &'static str,
        /// Where it was looked for.
        root: PathBuf,
    },
    /// The v2 tree lacks controllers (a hybrid host binds them to v1).
    #[error(
        "the jail needs the cgroup v2 controllers {} at {}, whose cgroup.controllers lists {}; enable them for cgroup v2 (on a hybrid host they are bound to the v1 mounts: boot with systemd.unified_cgroup_hierarchy=1 or cgroup_no_v1=memory,cpu,pids), or run with --no-jail",
        missing.join(", "),
        root.display(),
        if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
    )]
    V2Missing {
        /// The mount (or group) looked at.
        root: PathBuf,
        /// The controllers it does not offer.
        missing: Vec<&'static str>,
        /// The controllers it offers.
        listed: Vec<String>,
    },
}

/// Whether `path` is on a `cgroup2` file system.
fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a statfs the call writes into.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut s) };
    r == 0 && s.f_type as u64 == libc::CGROUP2_SUPER_MAGIC as u64
}

/// The words of a v2 list file (`cgroup.controllers`, `cgroup.subtree_control`).
fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

impl Hierarchy {
    /// The hierarchy at `root`: v2 where `root` is a `cgroup2` mount, else v1 (whose
    /// controllers [`Hierarchy::check`] then looks for). A hybrid host (a controller-less
    /// `cgroup2` at `/sys/fs/cgroup/unified`, the controllers on v1) is v1 at
    /// `/sys/fs/cgroup` and v2 at `/sys/fs/cgroup/unified`.
    pub fn at(root: &Path) -> Hierarchy {
        if is_cgroup2(root) {
            Hierarchy::V2 { root: root.to_path_buf() }
        } else {
            Hierarchy::V1 { root: root.to_path_buf() }
        }
    }

    /// Where it is rooted.
    pub fn root(&self) -> &Path {
        match self {
            Hierarchy::V1 { root } | Hierarchy::V2 { root } => root,
        }
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }

    /// The controllers of [`CONTROLLERS`] this hierarchy lacks, and (v2) those it lists.
    fn missing(&self) -> (Vec<&'static str>, Vec<String>) {
        match self {
            Hierarchy::V1 { root } => {
                // The root group of v1 `pids` has no `pids.max`: its `cgroup.procs` tells it is mounted.
                let probe = |c: &str| match c {
                    "memory" => "memory.limit_in_bytes",
                    "cpu" => "cpu.cfs_quota_us",
                    _ => "cgroup.procs",
                };
                (CONTROLLERS.into_iter().filter(|c| !root.join(c).join(probe(c)).exists()).collect(), Vec::new())
            }
            Hierarchy::V2 { root } => {
                let listed = words(&root.join("cgroup.controllers"));
                (CONTROLLERS.into_iter().filter(|c| !listed.iter().any(|l| l == c)).collect(), listed)
            }
        }
    }

    /// Whether every controller of [`CONTROLLERS`] is there.
    ///
    /// # Errors
    ///
    /// [`Unavailable::V1Missing`] naming the first missing v1 controller, or
    /// [`Unavailable::V2Missing`] naming every missing v2 one.
    pub fn check(&self) -> Result<(), Unavailable> {
        let (missing, listed) = self.missing();
        match (self, missing.first()) {
            (_, None) => Ok(()),
            (Hierarchy::V1 { root }, Some(c)) => Err(Unavailable::V1Missing { controller: c, root: root.clone() }),
            (Hierarchy::V2 { root }, Some(_)) => Err(Unavailable::V2Missing { root: root.clone(), missing, listed }),
        }
    }

    /// The directories holding the VMs' groups (the first: the one whose groups allocate uids).
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Hierarchy::V1 { root } => CONTROLLERS.iter().map(|c| root.join(c).join(PARENT)).collect(),
            Hierarchy::V2 { root } => vec![root.join(PARENT)],
        }
    }

    /// The directory whose entries are the uids taken (by a group each).
    pub(crate) fn lock_parent(&self) -> PathBuf {
        self.parents().swap_remove(0)
    }

    /// The group directories of `uid`; the first one's creation allocates the uid.
    pub fn groups(&self, uid: u32) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(uid.to_string())).collect()
    }

    /// The group directory of `uid` that holds `controller`'s files.
    pub fn group(&self, controller: &str, uid: u32) -> PathBuf {
        match self {
            Hierarchy::V1 { root } => root.join(controller).join(PARENT).join(uid.to_string()),
            Hierarchy::V2 { root } => root.join(PARENT).join(uid.to_string()),
        }
    }

    /// Creates the parent groups and, on v2, enables the controllers for the VMs' groups
    /// (in `<root>`'s `cgroup.subtree_control`, then in `hearth`'s): only those the tree
    /// offers, so that a tree without them still gets its groups (uids are allocated,
    /// processes can join) and [`Hierarchy::check`] is what refuses.
    ///
    /// # Errors
    ///
    /// A directory that cannot be made or a controller that cannot be enabled (`EBUSY`:
    /// `<root>` holds processes and is not the real root).
    pub(crate) fn prepare(&self) -> std::io::Result<()> {
        for p in self.parents() {
            std::fs::create_dir_all(&p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        }
        if let Hierarchy::V2 { root } = self {
            for dir in [root.clone(), root.join(PARENT)] {
                enable(&dir)?;
            }
        }
        Ok(())
    }

    /// The limit files of a VM's group, in the order they are written.
    pub fn settings(&self, limits: Limits) -> Vec<Setting> {
        let s = |controller, file, value: String, optional| Setting { controller, file, value, optional };
        let memory = limits.memory_bytes.to_string();
        match self {
            Hierarchy::V1 { .. } => vec![
                s("memory", "memory.limit_in_bytes", memory.clone(), false),
                // After the limit: the kernel refuses memsw below it.
                s("memory", "memory.memsw.limit_in_bytes", memory, true),
                s("cpu", "cpu.cfs_period_us", CFS_PERIOD_US.to_string(), false),
                s("cpu", "cpu.cfs_quota_us", limits.cpu_quota_us.to_string(), false),
                s("pids", "pids.max", limits.pids.to_string(), false),
            ],
            Hierarchy::V2 { .. } => vec![
                s("memory", "memory.max", memory, false),
                s("memory", "memory.swap.max", "0".to_owned(), true),
                s("cpu", "cpu.max", format!("{} {CFS_PERIOD_US}", limits.cpu_quota_us), false),
                s("pids", "pids.max", limits.pids.to_string(), false),
            ],
        }
    }
}

/// Enables in `dir`'s `cgroup.subtree_control` those of [`CONTROLLERS`] that `dir` offers
/// and has not enabled yet.
fn enable(dir: &Path) -> std::io::Result<()> {
    let listed = words(&dir.join("cgroup.controllers"));
    let on = words(&dir.join("cgroup.subtree_control"));
    let add: Vec<String> =
        CONTROLLERS.iter().filter(|c| listed.iter().any(|l| l == *c) && !on.iter().any(|o| o == *c)).map(|c| format!("+{c}")).collect();
    if add.is_empty() {
        return Ok(());
    }
    super::cgroup::write(dir, "cgroup.subtree_control", &add.join(" ")).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot enable {} for {}'s child groups: it holds processes (cgroup v2 allows no process in a group that \
                     enables controllers for its children); give the jail a cgroup root without processes, or run with --no-jail",
                    add.join(" "),
                    dir.display()
                ),
            )
        } else {
            e
        }
    })
}

#[cfg(test)]
#[path = "hierarchy_tests.rs"]
mod tests;
