//! A jail for every QEMU ([`crate::VmConfig::jail`]): on by default wherever the host can
//! jail ([`available`]: root, and the `memory`, `cpu` and `pids` controllers on cgroup v1
//! or v2: [`Hierarchy`]), off with `HEARTH_JAIL=0` or `hearth serve --no-jail`.
//!
//! Like Firecracker's `jailer`, the host prepares everything, then starts QEMU with
//! `clone3(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)`; between clone and
//! exec the child only makes system calls on data prepared before the clone (paths as
//! `CString`s, descriptors), in this order:
//!
//! 1. joins its cgroups (`hearth/<uid>` in v1's `memory`, `cpu`, `pids`, or v2's one
//!    `hearth/<uid>`; [`cgroup`], [`hierarchy`]) by writing `0` to their `cgroup.procs`,
//! 2. enters the VM's network namespace and opens `tap0` there (`TUNSETIFF`), so QEMU gets
//!    the tap as a descriptor (`-netdev tap,fd=N`) and never sees `/dev/net/tun`,
//! 3. mounts a tmpfs on `<run dir>/jail`, creates in it the device nodes QEMU needs
//!    (`null`, `zero`, `random`, `urandom`, and `kvm` owned by the jail's uid when KVM is
//!    used), binds read-only `/usr` (QEMU, its libraries and firmware; `/lib`, `/bin` are
//!    links into it), `/etc/ld.so.cache`, the kernel, initramfs, every file of the disk's
//!    backing chain ([`chain`]), a template's memory file and an incoming state file, and
//!    read-write the VM's `q/` directory (sockets, overlay, RAM file, migration output) and
//!    a resumed VM's own disk — each at the same path as on the host, so QEMU's command
//!    line and QMP paths need no translation — then `pivot_root`s into it, mounts a `proc`
//!    of its own PID namespace and remounts `/` read-only,
//! 4. sets rlimits (`NOFILE`, `CORE` 0), drops the capability bounding set and ambient
//!    capabilities, `setgroups([])`, `setresgid`/`setresuid` to the jail's uid (which clears
//!    the permitted and effective sets), sets `PR_SET_PDEATHSIG` (cleared by the uid change)
//!    and `PR_SET_NO_NEW_PRIVS`, and executes QEMU, whose `-sandbox on,…` adds seccomp.
//!
//! QEMU is PID 1 of its namespace; the pid the daemon keeps (and `vm.json` records) is
//! QEMU's own host pid, returned by `clone3` with a pidfd.
//!
//! **uids.** Each VM gets its own uid (= gid) from a range ([`JailConfig::uid_base`],
//! [`JailConfig::uid_count`]; default 65,536 from 1,300,000,000, above the ranges
//! `useradd` and `/etc/subuid` hand out). A dedicated single user would let one escaped
//! QEMU open another's files wherever their mount views overlap (templates' files are
//! shared read-only, and any future shared path); with one uid per VM, the kernel's own
//! permission checks keep them apart even then. A uid is allocated by creating its cgroup
//! (`mkdir` fails when taken), so concurrent daemons never share one.

pub mod cgroup;
pub mod chain;
mod child;
pub mod hierarchy;

use crate::accel::Accel;
use crate::config::{Memory, Start, VmConfig};
use crate::qemu::RunPaths;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use cgroup::Limits;
pub use hierarchy::{Hierarchy, Unavailable};

/// First uid (and gid) of the default range.
pub const DEFAULT_UID_BASE: u32 = 1_300_000_000;
/// Size of the default range.
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// QEMU's open-file limit: sockets, disk and backing files, multifd channels, eventfds
/// (a few per virtqueue and vCPU); QEMU needs well under 1,000.
pub const DEFAULT_NOFILE: u64 = 4096;
/// The directory under a run directory that the jailed QEMU owns and writes.
pub const QEMU_DIR: &str = "q";
/// Where the tmpfs root is mounted (in QEMU's mount namespace only; an empty directory on
/// the host).
pub const ROOT_DIR: &str = "jail";

/// How QEMU is jailed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailConfig {
    /// First uid (and gid) handed to a VM.
    pub uid_base: u32,
    /// How many uids the range holds (at most this many jailed VMs on the host).
    pub uid_count: u32,
    /// Where the cgroups are: the cgroup v1 controllers' mounts (`<root>/memory`, `/cpu`,
    /// `/pids`) or a cgroup v2 mount (told apart by [`Hierarchy::at`]).
    pub cgroup_root: PathBuf,
    /// The memory limit in MiB instead of the one sized from the VM ([`Limits::for_vm`]).
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            uid_base: DEFAULT_UID_BASE,
            uid_count: DEFAULT_UID_COUNT,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            memory_limit_mib: None,
            nofile: DEFAULT_NOFILE,
        }
    }
}

static DEFAULT: std::sync::RwLock<Option<Option<JailConfig>>> = std::sync::RwLock::new(None);

/// Sets the jail every [`VmConfig::new`] and [`crate::RestoreOptions::new`] of this process
/// starts with (`hearth serve --jail`), overriding `HEARTH_JAIL`.
pub fn set_default(jail: Option<JailConfig>) {
    *DEFAULT.write().unwrap_or_else(|p| p.into_inner()) = Some(jail);
}

/// The process's default jail: the one [`set_default`] gave; else `HEARTH_JAIL=1` (or
/// `true`, `yes`, `on`) means the default [`JailConfig`] and `HEARTH_JAIL=0` (anything
/// else) none; unset, the default [`JailConfig`] wherever the host can jail ([`available`]).
pub fn default_jail() -> Option<JailConfig> {
    if let Some(set) = DEFAULT.read().unwrap_or_else(|p| p.into_inner()).clone() {
        return set;
    }
    let on = match std::env::var("HEARTH_JAIL") {
        Ok(v) => switch_on(&v),
        Err(_) => available(Path::new("/sys/fs/cgroup")).is_ok(),
    };
    on.then(JailConfig::default)
}

fn switch_on(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// Whether this host can jail QEMU: root, and the `memory`, `cpu` and `pids` controllers
/// in the hierarchy at `cgroup_root` (v1 mounts under it, or a v2 mount offering them).
///
/// # Errors
///
/// [`Unavailable`], saying what is missing and what to do (enable the controllers, or
/// `--no-jail`).
pub fn available(cgroup_root: &Path) -> Result<Hierarchy, Unavailable> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Unavailable::NotRoot);
    }
    let hierarchy = Hierarchy::at(cgroup_root);
    hierarchy.check()?;
    Ok(hierarchy)
}

/// A jail that could not be prepared or entered.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every uid tried was taken.
    #[error("no free uid in {base}..{end} for the jail; widen the range or stop VMs", end = u64::from(*base) + u64::from(*count))]
    NoUid {
        /// Range start.
        base: u32,
        /// Range size.
        count: u32,
    },
    /// The host cannot jail ([`available`]).
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// A host file or cgroup operation failed.
    #[error("preparing the jail: {0}")]
    Io(#[from] std::io::Error),
    /// A path holds a NUL byte.
    #[error("{0} cannot be passed to the kernel (NUL byte)")]
    Nul(PathBuf),
}

/// One step the child takes in its tmpfs root (every path already prefixed by the root).
#[derive(Debug)]
pub(crate) enum Op {
    Dir(CString),
    File(CString),
    Link { target: CString, at: CString },
    Dev { at: CString, mode: u32, rdev: u64, owned: bool },
    Bind { src: CString, at: CString, readonly: bool, exec: bool },
}

/// Everything the child needs, prepared before the clone.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) uid: u32,
    pub(crate) root: CString,
    pub(crate) ops: Vec<Op>,
    pub(crate) procs: Vec<OwnedFd>,
    pub(crate) nofile: u64,
    /// The tap's descriptor number in QEMU, when it has a network.
    pub(crate) tap_fd: Option<i32>,
    pub(crate) cgroup: cgroup::Cgroup,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul(p.to_path_buf()))
}

/// The descriptor number QEMU finds its tap on (`-netdev tap,fd=`): above anything the
/// child holds while it sets up (it dup2s onto it last-but-exec).
pub const TAP_FD: i32 = 1000;

/// Gives a file QEMU wrote back to the host: owned by root, readable by every jail that
/// binds it (a template's files are read by all its clones, each under its own uid).
pub(crate) fn hand_back(path: &Path) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(0), Some(0))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
}

/// Makes a file the jail reads read-only readable by its uid: `o+r`. Only root and the
/// jails that bind the file reach it: `$HEARTH_HOME` and the API's state directory are
/// 0700, so other host users cannot traverse to it.
fn readable_by_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o004 == 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode((mode | 0o444) & 0o7777))?;
    }
    Ok(())
}

/// The uid that owns a jailed VM's `q/` directory.
pub(crate) fn uid_of(run_dir: &Path) -> Option<u32> {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(run_dir.join(QEMU_DIR)).ok()?).into()
}

/// Removes the cgroups of the jailed VM whose run directory is `run_dir` (a VM this
/// process does not hold: swept or discarded), once its QEMU is gone.
pub(crate) fn remove_groups(run_dir: &Path, jail: Option<&JailConfig>) {
    if let (Some(j), Some(uid)) = (jail, uid_of(run_dir)) {
        // The uid's lock last.
        cgroup::remove(Hierarchy::at(&j.cgroup_root).groups(uid).into_iter().rev().collect());
    }
}

/// Resolves QEMU's binary as `execve` needs it (an absolute path).
fn resolve_binary(b: &Path) -> PathBuf {
    if b.components().count() > 1 {
        return std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(b))
        .find(|c| c.is_file())
        .map(|c| std::fs::canonicalize(&c).unwrap_or(c))
        .unwrap_or_else(|| b.to_path_buf())
}

/// Allocates a uid and its cgroups, hands QEMU's files to it and plans the mount view.
/// `run_dir/q` exists already (with the overlay in it).
pub(crate) fn prepare(
    jail: &JailConfig,
    cfg: &VmConfig,
    accel: Accel,
    run_dir: &Path,
    paths: &RunPaths,
    binary: &Path,
) -> Result<(Prepared, PathBuf), JailError> {
    let hierarchy = available(&jail.cgroup_root)?;
    hierarchy.prepare()?;
    cgroup::sweep_empty(&hierarchy);
    let mut claimed = None;
    for _ in 0..64 {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
        let uid = jail.uid_base.saturating_add(u32::from_le_bytes(b) % jail.uid_count.max(1));
        if let Some(cg) = cgroup::Cgroup::claim(&hierarchy, uid)? {
            claimed = Some((uid, cg));
            break;
        }
    }
    let (uid, mut cgroup) = claimed.ok_or(JailError::NoUid { base: jail.uid_base, count: jail.uid_count })?;
    cgroup.configure(Limits::for_vm(cfg.memory_mib, cfg.vcpus, accel != Accel::Kvm, jail.memory_limit_mib))?;
    let procs = cgroup.procs_files()?;

    let q = run_dir.join(QEMU_DIR);
    std::os::unix::fs::chown(&q, Some(uid), Some(uid))?;
    std::fs::set_permissions(&q, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    for e in std::fs::read_dir(&q)?.flatten() {
        std::os::unix::fs::chown(e.path(), Some(uid), Some(uid))?;
    }
    let root = run_dir.join(ROOT_DIR);
    std::fs::create_dir_all(&root)?;

    // What QEMU reads (read-only) and writes (read-write), at their host paths.
    let mut ro: Vec<PathBuf> = vec![cfg.kernel.clone(), cfg.initramfs.clone()];
    let mut rw: Vec<PathBuf> = Vec::new();
    if let Some(disk) = &cfg.root {
        let top = if disk.overlay { paths.overlay.clone() } else { disk.path.clone() };
        if !disk.overlay {
            std::os::unix::fs::chown(&disk.path, Some(uid), Some(uid))?;
            rw.push(disk.path.clone());
        }
        ro.extend(chain::backing_chain(&top)?);
    }
    if let Memory::Template(m) = &cfg.memory {
        ro.push(m.clone());
    }
    if let Start::Incoming { state, .. } = &cfg.start {
        ro.push(state.clone());
    }
    let binary = resolve_binary(binary);
    if !binary.starts_with("/usr") {
        ro.push(binary.clone());
    }
    if Path::new("/etc/ld.so.cache").is_file() {
        ro.push("/etc/ld.so.cache".into());
    }

    let at = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut dirs = std::collections::BTreeSet::new();
    let mut ops = Vec::new();
    let mut binds = Vec::new();
    let add_parents = |p: &Path, dirs: &mut std::collections::BTreeSet<PathBuf>| {
        for a in p.ancestors().skip(1) {
            if a != Path::new("/") && !a.as_os_str().is_empty() {
                dirs.insert(a.to_path_buf());
            }
        }
    };
    for d in ["/usr", "/dev", "/proc", "/tmp"] {
        dirs.insert(PathBuf::from(d));
    }
    binds.push(Op::Bind { src: cstr(Path::new("/usr"))?, at: cstr(&at(Path::new("/usr")))?, readonly: true, exec: true });
    for l in ["lib", "lib64", "bin", "sbin"] {
        let host = Path::new("/").join(l);
        if let Ok(target) = std::fs::read_link(&host) {
            ops.push(Op::Link { target: cstr(&target)?, at: cstr(&at(&host))? });
        }
    }
    add_parents(&q, &mut dirs);
    dirs.insert(q.clone());
    binds.push(Op::Bind { src: cstr(&q)?, at: cstr(&at(&q))?, readonly: false, exec: false });
    let mut files = std::collections::BTreeSet::new();
    for (p, readonly) in ro.iter().map(|p| (p, true)).chain(rw.iter().map(|p| (p, false))) {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if p.starts_with("/usr") || p.starts_with(&q) || !files.insert(p.clone()) {
            continue;
        }
        if readonly {
            readable_by_all(&p)?;
        }
        add_parents(&p, &mut dirs);
        binds.push(Op::Bind { src: cstr(&p)?, at: cstr(&at(&p))?, readonly, exec: p == binary });
    }
    let mut plan: Vec<Op> = dirs.iter().map(|d| cstr(&at(d)).map(Op::Dir)).collect::<Result<_, _>>()?;
    plan.extend(files.iter().map(|f| cstr(&at(f)).map(Op::File)).collect::<Result<Vec<_>, _>>()?);
    plan.append(&mut ops);
    let mut devs = vec![("null", 0o666, libc::makedev(1, 3), false), ("zero", 0o666, libc::makedev(1, 5), false)];
    devs.push(("random", 0o666, libc::makedev(1, 8), false));
    devs.push(("urandom", 0o666, libc::makedev(1, 9), false));
    if accel == Accel::Kvm {
        if let Ok(m) = std::fs::metadata("/dev/kvm") {
            devs.push(("kvm", 0o600, std::os::unix::fs::MetadataExt::rdev(&m), true));
        }
    }
    for (name, mode, rdev, owned) in devs {
        plan.push(Op::Dev { at: cstr(&at(&Path::new("/dev").join(name)))?, mode, rdev, owned });
    }
    plan.append(&mut binds);
    let prepared =
        Prepared { uid, root: cstr(&root)?, ops: plan, procs, nofile: jail.nofile, tap_fd: cfg.network.as_ref().map(|_| TAP_FD), cgroup };
    Ok((prepared, binary))
}

pub(crate) use child::spawn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_takes_the_usual_words() {
        for v in ["1", "true", "YES", "on"] {
            assert!(switch_on(v), "{v}");
        }
        for v in ["0", "no", "false", ""] {
            assert!(!switch_on(v), "{v:?}");
        }
    }

    #[test]
    fn a_host_without_the_controllers_cannot_jail() {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let e = available(d.path()).unwrap_err();
        if root {
            assert_eq!(e, Unavailable::V1Missing { controller: "memory", root: d.path().to_path_buf() });
        } else {
            assert_eq!(e, Unavailable::NotRoot);
        }
        assert!(e.to_string().contains("--no-jail"), "{e}");
    }

    #[test]
    fn a_jail_config_round_trips_through_the_record() {
        let j = JailConfig { memory_limit_mib: Some(300), ..JailConfig::default() };
        let s = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<JailConfig>(&s).unwrap(), j);
    }
}
