//! Starting VMs from snapshots: launching clones of a template, resuming a suspended VM,
//! starting the copies of a fork.
//!
//! QEMU starts with `-incoming defer` and the same machine as the snapshot; the host sets
//! the migration capabilities the snapshot was written with, points `migrate-incoming` at
//! the state file and polls until it is loaded (the VM then runs by itself). Templates keep
//! RAM in a separate file that the new VM maps private copy-on-write, so loading is only
//! device state (milliseconds, whatever the memory size). Suspended VMs and forks carry RAM
//! in `mapped-ram` layout; loading reads the non-zero pages back.
//!
//! Before any user command runs, the agent gets fresh clock, entropy and identity
//! ([`hearth_proto::RestoreInfo`]).

use crate::config::{Disk, DiskFormat, Memory, Start, VmConfig};
use crate::qmp::Qmp;
use crate::snapshot::{Snapshot, SnapshotKind};
use crate::vm::{BootError, Vm};
use hearth_proto::binpath::BinPath;
use hearth_proto::RestoreInfo;
use serde_json::json;
use std::path::{Path, PathBuf};
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
        }
    }
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The host's wall clock in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

/// Fresh clock, entropy and identity for a restored VM.
pub fn fresh_identity(hostname: String) -> RestoreInfo {
    let entropy = crate::vm::os_random::<64>().to_vec();
    let id = crate::vm::os_random::<16>();
    RestoreInfo {
        unix_time_ns: now_ns(),
        entropy: BinPath(entropy),
        hostname: Some(hostname),
        machine_id: Some(id.iter().map(|b| format!("{b:02x}")).collect()),
    }
}

/// Connects to QMP, sets the snapshot's capabilities, loads `state`, and waits until QEMU
/// reports the migration completed (the VM then runs). Returns the QMP session.
pub(crate) async fn load_incoming(qmp_path: &Path, state: &Path, mapped_ram: bool) -> Result<Qmp, String> {
    // The socket file appears at bind(), a moment before QEMU listens: retry briefly.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut qmp = loop {
        match Qmp::connect(qmp_path).await {
            Ok(q) => break q,
            Err(e) if tokio::time::Instant::now() > give_up => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    qmp.execute("migrate-set-capabilities", Some(capabilities(mapped_ram))).await.map_err(|e| e.to_string())?;
    qmp.execute("migrate-set-parameters", Some(parameters(mapped_ram))).await.map_err(|e| e.to_string())?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("file:{}", state.display()) }))).await.map_err(|e| e.to_string())?;
    loop {
        let r = qmp.execute("query-migrate", None).await.map_err(|e| e.to_string())?;
        match r.get("status").and_then(|s| s.as_str()) {
            Some("completed") => {
                // The VM was stopped when it was saved, so it stays paused after loading.
                qmp.execute("cont", None).await.map_err(|e| e.to_string())?;
                tracing::debug!(state = %state.display(), "snapshot loaded, VM running");
                return Ok(qmp);
            }
            Some("failed") | Some("cancelled") => {
                let why = r.get("error-desc").and_then(|s| s.as_str()).unwrap_or("unknown error");
                return Err(format!("QEMU could not load the state: {why}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Migration capabilities for templates (`x-ignore-shared`: RAM stays in its file) or
/// suspend images (`mapped-ram`: RAM pages at fixed offsets, zero pages skipped).
pub(crate) fn capabilities(mapped_ram: bool) -> serde_json::Value {
    json!({ "capabilities": [
        { "capability": "x-ignore-shared", "state": !mapped_ram },
        { "capability": "mapped-ram", "state": mapped_ram },
        // With mapped-ram every page has a fixed place in the file, so several threads
        // can write (and read back) RAM at once.
        { "capability": "multifd", "state": mapped_ram },
    ]})
}

/// Migration parameters matching [`capabilities`].
pub(crate) fn parameters(mapped_ram: bool) -> serde_json::Value {
    let mut p = json!({ "max-bandwidth": 64u64 << 30 });
    if mapped_ram {
        p["multifd-channels"] = json!(MULTIFD_CHANNELS);
    }
    p
}

/// Threads QEMU uses to write or read RAM of a suspend image.
const MULTIFD_CHANNELS: u8 = 4;

fn base_config(snap: &Snapshot, opts: &RestoreOptions) -> VmConfig {
    let m = &snap.manifest;
    let mut cfg = VmConfig::new(&m.kernel, &m.initramfs);
    cfg.memory_mib = m.memory_mib;
    cfg.vcpus = m.vcpus;
    cfg.accel = m.accel.parse().unwrap_or(crate::Accel::Tcg);
    cfg.boot_timeout = opts.timeout;
    cfg.run_root = opts.run_root.clone();
    cfg.hostname = m.hostname.clone();
    cfg.detached = opts.detached;
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
    /// the snapshot is retired (its manifest and state removed). If the resume fails the
    /// snapshot is left untouched and can be resumed again.
    pub async fn resume(snap: &Snapshot, opts: &RestoreOptions) -> Result<Vm, BootError> {
        tracing::debug!(dir = %snap.dir.display(), "resume");
        let mut cfg = restore_config(snap, opts, SnapshotKind::Suspended)?;
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
        let retired = snap.dir.join(".manifest.resuming");
        std::fs::rename(&manifest, &retired)
            .map_err(|e| BootError::Snapshot(crate::snapshot::SnapshotError::Io { what: "retire the manifest".into(), source: e }))?;
        crate::snapshot::sync_dir(&snap.dir);
        match Self::start_restored(cfg, &opts).await {
            Ok(vm) => {
                let _ = std::fs::remove_file(&retired);
                let _ = std::fs::remove_file(snap.path(&snap.manifest.state.name));
                crate::snapshot::sync_dir(&snap.dir);
                Ok(vm)
            }
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
        let hostname = opts.hostname.clone().unwrap_or_else(|| {
            let b = crate::vm::os_random::<4>();
            format!("hearth-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
        });
        let mut vm = Self::start(cfg, Some(fresh_identity(hostname.clone()))).await?;
        // (start() refreshes the clock in the identity right before sending it.)
        vm.cfg.hostname = hostname;
        Ok(vm)
    }
}
