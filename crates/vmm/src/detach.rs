//! VMs that outlive the process that started them: a detached VM
//! ([`crate::VmConfig::detached`]) records what it is made of in `vm.json` in its run
//! directory; [`Vm::release`] lets it run on without this process, and [`Vm::reattach`]
//! (in any later process) takes it back: it adopts QEMU by pid (checked against the VM's
//! id in QEMU's command line, so a reused pid is never mistaken for it), takes the run
//! directory's lock, and reconnects QMP, the console and the agent (whose resync
//! handshake makes a new host connection safe at any time).

use crate::accel::Accel;
use crate::agent::AgentClient;
use crate::config::VmConfig;
use crate::console::ConsoleTap;
use crate::net::{Egress, NetNs};
use crate::qemu::{QemuProcess, RunPaths};
use crate::qmp::Qmp;
use crate::rundir::RunDir;
use crate::vm::{BootError, Vm};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `vm.json` holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct Persisted {
    id: String,
    cfg: VmConfig,
    accel: Accel,
    pid: u32,
    disk: Option<PathBuf>,
    disk_owned: bool,
    netns: Option<String>,
    egress: Option<Egress>,
}

/// The file in a run directory.
const FILE: &str = "vm.json";

/// True when `dir` holds a detached VM whose QEMU still runs (the sweep leaves it).
pub(crate) fn live_detached(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(FILE)) else { return false };
    let Ok(p) = serde_json::from_str::<Persisted>(&text) else { return false };
    qemu_is(p.pid, &p.id)
}

/// True when process `pid` is the QEMU of VM `id`.
fn qemu_is(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|arg| arg == format!("{id},process=hearth-{id}").as_bytes()))
        .unwrap_or(false)
}

fn err(msg: impl Into<String>) -> BootError {
    BootError::Reattach(msg.into())
}

/// Writes `vm.json` into `dir`, atomically (called right after QEMU starts, so a crash
/// during boot still leaves a VM that can be found and killed, and after every change).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write(
    dir: &Path,
    id: &str,
    cfg: &VmConfig,
    accel: Accel,
    pid: u32,
    disk: Option<PathBuf>,
    disk_owned: bool,
    netns: Option<String>,
    egress: Option<Egress>,
) {
    if !cfg.detached {
        return;
    }
    let p = Persisted { id: id.to_owned(), cfg: cfg.clone(), accel, pid, disk, disk_owned, netns, egress };
    let tmp = dir.join(".vm.json.tmp");
    if std::fs::write(&tmp, serde_json::to_vec(&p).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(FILE));
    }
}

/// Kills detached VMs under `run_root` that no process holds (their lock is free) while
/// their QEMU runs: VMs whose owner died before recording them anywhere. Their network
/// namespaces go with them; the run-directory sweep removes the rest.
pub fn kill_unowned_detached(run_root: &Path) -> usize {
    let mut killed = 0;
    for e in std::fs::read_dir(run_root).into_iter().flatten().flatten() {
        let dir = e.path();
        let Ok(text) = std::fs::read_to_string(dir.join(FILE)) else { continue };
        let Ok(p) = serde_json::from_str::<Persisted>(&text) else { continue };
        // Taking the lock proves nobody owns it; holding it keeps others off meanwhile.
        let Ok(lock) = RunDir::adopt(dir.clone()) else { continue };
        if let Ok(pidfd) = crate::qemu::open_pidfd(p.pid) {
            if qemu_is(p.pid, &p.id) {
                crate::qemu::pidfd_kill(&pidfd);
                tracing::warn!(vm = %p.id, pid = p.pid, "killed a detached VM nobody owned");
                killed += 1;
            }
        }
        if p.netns.is_some() {
            crate::net::remove_stale(&p.id);
        }
        drop(lock);
    }
    killed
}

impl Vm {
    /// Writes `vm.json` (detached VMs only).
    pub(crate) fn persist(&self) {
        write(
            &self._dir.0,
            &self.id,
            &self.cfg,
            self.accel,
            self.process.pid(),
            self.disk.clone(),
            self.disk_owned,
            self.netns().map(str::to_owned),
            self.egress(),
        );
    }

    /// Kills QEMU at once through its pidfd (detached or adopted VMs; others are killed
    /// when their handle drops). For callers that only share the VM.
    pub fn kill_now(&self) {
        self.process.kill_now();
    }

    /// The VM's run directory.
    pub fn run_dir(&self) -> &Path {
        &self._dir.0
    }

    /// Lets a detached VM run on without this process; returns its run directory, which
    /// [`Vm::reattach`] takes. A VM that is not detached is killed instead (it could not
    /// be found again).
    pub fn release(self) -> PathBuf {
        let dir = self._dir.0.clone();
        if !self.cfg.detached {
            drop(self);
            return dir;
        }
        self.persist();
        let Vm { process, net, _dir, .. } = self;
        process.release();
        if let Some((ns, _)) = net {
            ns.release();
        }
        _dir.release();
        dir
    }

    /// Takes back a detached VM from its run directory (after the process that started it
    /// released it or died). Fails when its QEMU is gone or another process holds it.
    pub async fn reattach(dir: &Path) -> Result<Vm, BootError> {
        let text = std::fs::read_to_string(dir.join(FILE)).map_err(|e| err(format!("{}: {e}", dir.join(FILE).display())))?;
        let p: Persisted = serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", dir.join(FILE).display())))?;
        let rundir = RunDir::adopt(dir.to_path_buf()).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        // Owned from here: failing below removes the namespace with the handle.
        let net = p.netns.map(|n| (NetNs::adopt(n), std::sync::Mutex::new(p.egress.unwrap_or_default())));
        // The pidfd first, then the check: the pid cannot be reused in between.
        let process = QemuProcess::adopt(p.pid).map_err(|e| err(format!("adopt QEMU {}: {e}", p.pid)))?;
        if !qemu_is(p.pid, &p.id) {
            process.release();
            return Err(err(format!("the QEMU of {} (pid {}) is gone", p.id, p.pid)));
        }
        let paths = RunPaths::new(dir);
        let console = ConsoleTap::start(&paths);
        let qmp = Qmp::connect(&paths.qmp).await.ok();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (agent, hello) = AgentClient::connect_retrying(&paths.agent, deadline)
            .await
            .map_err(|e| err(format!("the agent of {} does not answer: {e}", p.id)))?;
        tracing::info!(vm = %p.id, pid = p.pid, "reattached");
        Ok(Vm {
            process,
            net,
            agent,
            qmp: tokio::sync::Mutex::new(qmp),
            hello,
            accel: p.accel,
            id: p.id,
            paths,
            boot_time: Duration::ZERO,
            _console: console,
            cfg: p.cfg,
            disk: p.disk,
            disk_owned: p.disk_owned,
            _dir: rundir,
        })
    }
}
