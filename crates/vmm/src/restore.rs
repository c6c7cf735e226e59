//! Starting VMs from snapshots: launching clones of a template, resuming a suspended VM,
//! starting the copies of a fork.
//!
//! QEMU starts with `-incoming defer` and the same machine as the snapshot, and
//! [`crate::migration::load`] loads the state file (the VM then runs by itself). Templates keep
//! RAM in a separate file that the new VM maps private copy-on-write, so loading is only
//! device state (milliseconds, whatever the memory size). Suspended VMs and forks carry RAM
//! in `mapped-ram` layout; loading reads the pages of the image back. A suspended VM that
//! was launched from a template maps its template's RAM file again (linked into the
//! snapshot as `memory`), and its image holds only the pages it changed
//! ([`crate::ramdiff`]): a resume reads those, and the rest is read when the guest
//! touches it, as for a launch.
//!
//! Before any user command runs, the agent gets fresh clock, entropy and identity
//! ([`hearth_proto::RestoreInfo`]).

use crate::config::{Disk, DiskFormat, Memory, Start, VmConfig};
pub use crate::identity::{fresh_identity, now_ns};
use crate::snapshot::{Snapshot, SnapshotKind};
use crate::vm::{BootError, Vm};
use std::path::PathBuf;
use std::time::Duration;

/// Options for starting from a snapshot.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where the VM's run directory goes.
    pub run_root: PathBuf,
    /// Limit for QEMU start, state load and agent handshake together.
    pub timeout: Duration,
    /// Hostname for the new VM (default: its VM id).
    pub hostname: Option<String>,
    /// Egress policy for a snapshot with a network device. By default a suspended or
    /// forked VM keeps the policy it had, and a template's clones get none (egress is
    /// closed unless the launcher opens it).
    pub egress: Option<crate::net::Egress>,
    /// Start QEMU detached ([`crate::VmConfig::detached`]).
    pub detached: bool,
    /// The caller's name for the new VM ([`crate::VmConfig::name`]: in QEMU's process
    /// name and in every log line about the VM); the API passes its microvm id.
    pub name: Option<String>,
    /// The new VM's jail ([`crate::VmConfig::jail`]); defaults to the process's.
    pub jail: Option<crate::jail::JailConfig>,
    /// The new VM's disk and network limits ([`crate::VmConfig::limits`]): a snapshot
    /// does not carry them. Defaults to the process's.
    pub limits: crate::limits::IoLimits,
}

impl RestoreOptions {
    /// Defaults: `$HEARTH_HOME/run`, 60 s.
    pub fn new() -> Self {
        RestoreOptions {
            run_root: crate::home::hearth_home().join("run"),
            timeout: Duration::from_secs(60),
            hostname: None,
            egress: None,
            detached: false,
            name: None,
            jail: crate::jail::default_jail(),
            limits: crate::limits::default_limits(),
        }
    }
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self::new()
    }
}

fn base_config(snap: &Snapshot, opts: &RestoreOptions) -> VmConfig {
    let m = &snap.manifest;
    let mut cfg = VmConfig::for_arch(&m.kernel, &m.initramfs, m.arch);
    cfg.memory_mib = m.memory_mib;
    cfg.vcpus = m.vcpus;
    cfg.accel = m.accel.parse().unwrap_or(crate::Accel::Tcg);
    cfg.boot_timeout = opts.timeout;
    cfg.run_root = opts.run_root.clone();
    cfg.hostname = m.hostname.clone();
    cfg.detached = opts.detached;
    cfg.name = opts.name.clone();
    cfg.jail = opts.jail.clone();
    cfg.limits = opts.limits;
    cfg.network = m.network.as_ref().map(|recorded| {
        opts.egress.clone().unwrap_or_else(|| if m.kind == SnapshotKind::Template { crate::net::Egress::none() } else { recorded.clone() })
    });
    cfg
}

/// The configuration to restore `snap`, which must be of `kind`: the snapshot's machine,
/// its state file as incoming migration, an overlay on its disk.
fn restore_config(snap: &Snapshot, opts: &RestoreOptions, kind: SnapshotKind) -> Result<VmConfig, BootError> {
    if snap.manifest.kind != kind {
        return Err(BootError::Snapshot(crate::snapshot::SnapshotError::Unsupported(format!(
            "{} is a {:?} snapshot; this needs a {kind:?} one (templates launch, suspended VMs resume, forks launch_fork)",
            snap.dir.display(),
            snap.manifest.kind
        ))));
    }
    let mut cfg = base_config(snap, opts);
    check_qemu(snap, &cfg)?;
    let mapped_ram = kind != SnapshotKind::Template;
    cfg.start = Start::Incoming { state: snap.path(&snap.manifest.state.name), mapped_ram };
    if let Some(d) = &snap.manifest.disk {
        cfg.root = Some(Disk::base(snap.path(d), DiskFormat::Qcow2));
    }
    Ok(cfg)
}

fn check_qemu(snap: &Snapshot, cfg: &VmConfig) -> Result<(), BootError> {
    let here = crate::snapshot::qemu_version(&cfg.qemu_binary);
    if here != snap.manifest.qemu_version {
        return Err(BootError::Snapshot(crate::snapshot::SnapshotError::Invalid {
            path: snap.dir.clone(),
            reason: format!("it was taken with {:?}; this host runs {here:?}", snap.manifest.qemu_version),
        }));
    }
    Ok(())
}

impl Vm {
    /// Launches a new VM from a template snapshot: RAM mapped copy-on-write from the
    /// snapshot's memory file, its own overlay on the snapshot's disk, fresh identity.
    /// Any number of VMs may be launched from one template at once.
    pub async fn launch(snap: &Snapshot, opts: &RestoreOptions) -> Result<Vm, BootError> {
        let mut cfg = restore_config(snap, opts, SnapshotKind::Template)?;
        let memory = snap.manifest.memory.as_ref().expect("templates have memory (checked on open)");
        cfg.memory = Memory::Template(snap.path(&memory.name));
        Self::start_restored(cfg, opts).await
    }

    /// Starts one copy of a fork snapshot (its own overlay on the fork's disk).
    pub async fn launch_fork(snap: &Snapshot, opts: &RestoreOptions) -> Result<Vm, BootError> {
        let cfg = restore_config(snap, opts, SnapshotKind::Fork)?;
        Self::start_restored(cfg, opts).await
    }

    /// Resumes a suspended VM. Its disk stays in the snapshot directory and the VM writes
    /// to it in place; once the VM runs, the saved state no longer matches that disk, so
    /// the manifest is retired (renamed to [`RETIRED_MANIFEST`]) before the guest runs. The
    /// retired manifest and the state file stay until the caller has recorded the resumed
    /// VM and calls [`finish_resume`]: a crash before that finds them, and
    /// [`crate::recover`] either reattaches the new VM or puts the snapshot back. If the
    /// resume fails before the guest ran, the snapshot is put back and can be resumed again.
    pub async fn resume(snap: &Snapshot, opts: &RestoreOptions) -> Result<Vm, BootError> {
        tracing::debug!(dir = %snap.dir.display(), "resume");
        let mut cfg = restore_config(snap, opts, SnapshotKind::Suspended)?;
        if let Some(memory) = &snap.manifest.memory {
            // Format 2: the image is a diff over this file, mapped as a launch maps it.
            cfg.memory = Memory::Template(snap.path(&memory.name));
        }
        if let Some(root) = cfg.root.as_mut() {
            // The disk moves with the VM: written in place, no overlay.
            root.overlay = false;
        }
        let keep_hostname = opts.hostname.clone().or_else(|| Some(snap.manifest.hostname.clone()));
        let opts = RestoreOptions { hostname: keep_hostname, ..opts.clone() };
        // Once the guest runs it writes the disk in place, and the saved RAM no longer
        // matches it: retire the manifest *before* that, durably, so a crash can never
        // leave a snapshot that would resume stale memory over a newer disk. It is put
        // back only if QEMU failed before the guest ran.
        let manifest = snap.dir.join("manifest.json");
        let retired = snap.dir.join(RETIRED_MANIFEST);
        crate::crash::point("resume.before-retire");
        std::fs::rename(&manifest, &retired)
            .map_err(|e| BootError::Snapshot(crate::snapshot::SnapshotError::Io { what: "retire the manifest".into(), source: e }))?;
        crate::snapshot::sync_dir(&snap.dir);
        crate::crash::point("resume.retired");
        match Self::start_restored(cfg, &opts).await {
            Ok(vm) => Ok(vm),
            Err(e) if e.guest_never_ran() => {
                let _ = std::fs::rename(&retired, &manifest);
                crate::snapshot::sync_dir(&snap.dir);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn start_restored(cfg: VmConfig, opts: &RestoreOptions) -> Result<Vm, BootError> {
        // The hostname is decided before the VM id exists; use a fresh random one unless
        // the caller chose.
        let hostname = opts.hostname.clone().unwrap_or_else(|| format!("hearth-{}", crate::identity::random_hex::<4>()));
        let mut vm = Self::start(cfg, Some(fresh_identity(hostname.clone()))).await?;
        // (start() refreshes the clock in the identity right before sending it.)
        vm.record.cfg.hostname = hostname;
        Ok(vm)
    }
}

/// The name a resumed snapshot's manifest has from the moment its guest may run until the
/// resumed VM is recorded ([`finish_resume`]).
pub const RETIRED_MANIFEST: &str = ".manifest.resuming";

/// Removes what is left of a resumed snapshot (its retired manifest and state file; the
/// disk stays, the VM writes it, and so does a base `memory` file, which the VM maps) once the caller has durably recorded the resumed VM.
/// Before that call a crash leaves the snapshot recoverable ([`crate::recover`]).
pub fn finish_resume(dir: &std::path::Path) {
    let _ = std::fs::remove_file(dir.join(RETIRED_MANIFEST));
    let _ = std::fs::remove_file(dir.join("state"));
    crate::snapshot::sync_dir(dir);
}
