//! VMs that outlive the process that started them: a detached VM
//! ([`crate::VmConfig::detached`]) keeps its record ([`crate::record`], `vm.json`) in its
//! run directory; [`Vm::release`] lets it run on without this process, and
//! [`Vm::reattach`] (in any later process, of this release or a later one) takes it back:
//! it adopts QEMU by pid (checked against the VM's id in QEMU's command line, so a reused
//! pid is never mistaken for it), takes the run directory's lock, and reconnects QMP, the
//! console and the agent (whose resync handshake makes a new host connection safe at any
//! time).

use crate::agent::AgentClient;
use crate::console::ConsoleTap;
use crate::net::NetNs;
use crate::qemu::{QemuProcess, RunPaths};
use crate::qmp::Qmp;
use crate::record::VmRecord;
use crate::rundir::RunDir;
use crate::vm::{BootError, Vm};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::Instrument;

fn err(msg: impl Into<String>) -> BootError {
    BootError::Reattach(msg.into())
}

impl Vm {
    /// Writes `vm.json` (detached VMs only).
    pub(crate) fn persist(&self) {
        self.record.write(&self._dir.0);
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
        if !self.record.cfg.detached {
            drop(self);
            return dir;
        }
        self.persist();
        let Vm { process, cgroup, net, _dir, .. } = self;
        process.release();
        if let Some(c) = cgroup {
            c.release();
        }
        if let Some(ns) = net {
            ns.release();
        }
        _dir.release();
        dir
    }

    /// Takes back a detached VM from its run directory (after the process that started it
    /// released it or died). Fails when its QEMU is gone, another process holds it, or its
    /// agent does not answer within 10 s (then QEMU is killed and its
    /// run directory removed).
    pub async fn reattach(dir: &Path) -> Result<Vm, BootError> {
        Self::reattach_with(dir, false).await
    }

    /// Like [`Vm::reattach`], for a VM that a capture cut off by a crash left stopped: any
    /// migration still under way is cancelled and the vCPUs are continued (QMP
    /// `migrate_cancel`, `cont`) before the agent is reconnected.
    pub async fn reattach_continuing(dir: &Path) -> Result<Vm, BootError> {
        Self::reattach_with(dir, true).await
    }

    async fn reattach_with(dir: &Path, continuing: bool) -> Result<Vm, BootError> {
        let mut record = VmRecord::read(dir).map_err(|e| err(e.chain()))?;
        let span = record.span();
        let rundir = RunDir::adopt(dir.to_path_buf()).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        // Owned from here: failing below removes the namespace with the handle.
        let net = record.netns.clone().map(NetNs::adopt);
        if let Some(ns) = &net {
            let egress = record.egress.get_mut().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Default::default);
            // The domain guard went with the process that released the VM: this one's.
            if !egress.domains.is_empty() {
                ns.set_egress(egress).map_err(|e| err(format!("restart the domain guard: {e}")))?;
            }
        }
        // The pidfd first, then the check: the pid cannot be reused in between.
        let process = QemuProcess::adopt(record.pid).map_err(|e| err(format!("adopt QEMU {}: {e}", record.pid)))?;
        if !record.qemu_runs() {
            process.release();
            return Err(err(format!("the QEMU of {} (pid {}) is gone", record.id, record.pid)));
        }
        let paths = RunPaths::for_config(dir, &record.cfg);
        let cgroup =
            record.cfg.jail.as_ref().zip(crate::jail::uid_of(dir)).map(|(j, uid)| crate::jail::cgroup::Cgroup::adopt(&j.cgroup_root, uid));
        let console = ConsoleTap::start(&paths);
        let connect = async {
            // Retried: QEMU takes the new monitor client only once it has seen the old
            // one (the dead process's) hang up.
            let mut qmp = tokio::time::timeout(QMP_WAIT, Qmp::connect_retrying(&paths.qmp, QMP_WAIT)).await.ok().and_then(Result::ok);
            if continuing && qmp.is_none() {
                tracing::warn!("no QMP connection to continue a stopped VM");
            }
            if let (true, Some(q)) = (continuing, qmp.as_mut()) {
                continue_stopped(q).await;
            }
            let deadline = tokio::time::Instant::now() + REATTACH_AGENT_WAIT;
            let agent = AgentClient::connect_retrying(&paths.agent, deadline).await;
            (qmp, agent)
        };
        let (qmp, agent) = connect.instrument(span.clone()).await;
        let (agent, hello) = agent.map_err(|e| err(format!("the agent of {} does not answer: {e}", record.id)))?;
        span.in_scope(|| tracing::info!(pid = record.pid, "reattached"));
        let vm = Vm {
            process,
            cgroup,
            net,
            agent,
            qmp: tokio::sync::Mutex::new(qmp),
            hello,
            paths,
            boot_time: Duration::ZERO,
            _console: console,
            record,
            span,
            _dir: rundir,
        };
        // Written back in this release's format.
        vm.persist();
        Ok(vm)
    }
}

/// How long a reattach waits for a guest's agent. A running guest answers in
/// milliseconds; the 30 s this once was made a restart wait 30 s for every paused or
/// hung VM (one after another), with the API not yet listening.
pub(crate) const REATTACH_AGENT_WAIT: Duration = Duration::from_secs(10);
/// How long a reattach waits for QEMU's monitor.
const QMP_WAIT: Duration = Duration::from_secs(3);

/// Cancels a migration still under way (a suspend whose process died) and continues the
/// vCPUs; best effort, every step bounded.
async fn continue_stopped(q: &mut Qmp) {
    let t = Duration::from_secs(3);
    let _ = q.execute_timeout("migrate_cancel", None, t).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let status = q.execute_timeout("query-migrate", None, t).await.ok();
        let s = status.as_ref().and_then(|v| v.get("status")).and_then(serde_json::Value::as_str).unwrap_or("none").to_owned();
        if !matches!(s.as_str(), "setup" | "active" | "cancelling" | "device" | "wait-unplug" | "pre-switchover") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Err(e) = q.execute_timeout("cont", None, t).await {
        tracing::warn!("cont after an interrupted capture: {e}");
    }
}
