//! A booted VM: QEMU running, agent answering.
//!
//! [`Vm::boot`] validates the configuration, creates the VM's run directory and root-disk
//! overlay, starts QEMU and waits for the agent's handshake while watching QEMU: a QEMU
//! that exits, or a guest that does not answer in time, is an error carrying the console's
//! last lines, and everything created so far is released (the guards below drop in reverse
//! order: QEMU first, then the run directory).

use crate::accel::{self, Accel};
use crate::agent::{AgentClient, AgentError, ExecOutput, ExecStream};
use crate::config::{ConfigError, Start, VmConfig};
use crate::console::ConsoleTap;
pub use crate::console::{file_tail, MAX_CONSOLE_BYTES};
use crate::net::{Egress, NetNs};
use crate::qemu::{self, QemuProcess, RunPaths};
use crate::qmp::{Qmp, QmpError};
use crate::record::VmRecord;
pub use crate::rundir::kill_unowned_detached;
pub use crate::rundir::sweep_stale_run_dirs;
use crate::rundir::RunDir;
use hearth_proto::exec::ExecRequest;
use hearth_proto::Hello;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tracing::Instrument;

mod errors;
pub use errors::*;

/// Lines of console output quoted in errors.
const CONSOLE_TAIL_LINES: usize = 25;
/// Pause between dropping the agent connection and making a new one.
const RECONNECT_SETTLE: Duration = Duration::from_millis(150);

/// A running VM. Dropping it kills QEMU and removes its run directory.
pub struct Vm {
    // Field order is drop order: QEMU goes before its directory.
    pub(crate) process: QemuProcess,
    /// A jailed QEMU's cgroups (after QEMU: removed once it is gone).
    pub(crate) cgroup: Option<crate::jail::cgroup::Cgroup>,
    /// The VM's network namespace (after QEMU: it goes away with its last process).
    pub(crate) net: Option<NetNs>,
    pub(crate) agent: AgentClient,
    pub(crate) qmp: tokio::sync::Mutex<Option<Qmp>>,
    pub(crate) hello: Hello,
    pub(crate) paths: RunPaths,
    pub(crate) boot_time: Duration,
    pub(crate) _console: ConsoleTap,
    /// What the VM is made of and where it stands: what `vm.json` records.
    pub(crate) record: VmRecord,
    /// The span every log line about the VM is made in ([`crate::record::span`]).
    pub(crate) span: tracing::Span,
    pub(crate) _dir: RunDir,
}

/// Logs an event in a VM's span: `vm_event!(vm, warn, "...")`.
macro_rules! vm_event {
    ($vm:expr, $level:ident, $($arg:tt)+) => {
        $vm.span.in_scope(|| tracing::$level!($($arg)+))
    };
}
pub(crate) use vm_event;

/// Refuses a relative path (QEMU records backing files by the path it is given).
fn require_absolute(p: &Path) -> Result<(), VmError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(VmError::Invalid(format!("{} must be an absolute path", p.display())))
    }
}

/// True when a QMP session that returned `e` may be mid-message: after an I/O error, a
/// timeout or a protocol error the next command must use a new session.
pub(crate) fn breaks_session(e: &QmpError) -> bool {
    matches!(e, QmpError::Io(_) | QmpError::Timeout(_) | QmpError::Protocol(_))
}

impl Vm {
    /// Boots a VM and waits for its agent.
    pub async fn boot(cfg: VmConfig) -> Result<Vm, BootError> {
        match Self::start(cfg.clone(), None).await {
            // `auto` chose a KVM that cannot boot (it emulates): record it and use TCG.
            Err(BootError::Timeout { timeout, accel: used, console }) if accel::made_no_progress(cfg.accel, used, &console) => {
                let reason = format!("a VM booted with KVM showed no console output in {timeout:?}");
                accel::record_boot_without_progress(&cfg.qemu_binary, reason);
                Self::start(VmConfig { accel: Accel::Tcg, ..cfg }, None).await
            }
            r => r,
        }
    }

    /// Starts QEMU for `cfg` (booting, or restoring when `cfg.start` is incoming), waits
    /// for the agent, and applies `restore` fix-ups when given.
    pub(crate) async fn start(cfg: VmConfig, restore: Option<hearth_proto::RestoreInfo>) -> Result<Vm, BootError> {
        cfg.validate()?;
        let id = crate::identity::random_vm_id();
        let span = crate::record::span(&id, cfg.name.as_deref());
        Self::start_in_span(cfg, restore, id, span.clone()).instrument(span).await
    }

    async fn start_in_span(
        cfg: VmConfig,
        restore: Option<hearth_proto::RestoreInfo>,
        id: String,
        span: tracing::Span,
    ) -> Result<Vm, BootError> {
        let started = Instant::now();
        let accel = accel::resolve_for(&cfg).await;
        let dir_path = cfg.run_root.join(&id);
        let dir = RunDir::create(dir_path.clone()).map_err(|source| BootError::RunDir { path: dir_path.clone(), source })?;
        let paths = RunPaths::for_config(&dir_path, &cfg);
        if paths.agent.as_os_str().len() >= 108 {
            return Err(BootError::PathTooLong(dir_path));
        }
        if cfg.jail.is_some() {
            let q = dir_path.join(crate::jail::QEMU_DIR);
            std::fs::create_dir(&q).map_err(|source| BootError::RunDir { path: q, source })?;
        }
        if let Some(disk) = cfg.root.as_ref().filter(|d| d.overlay) {
            qemu::create_overlay(&disk.path, disk.format.as_str(), &paths.overlay).map_err(BootError::Overlay)?;
        }
        let disk = match &cfg.root {
            Some(d) if d.overlay => Some(paths.overlay.clone()),
            Some(d) => Some(d.path.clone()),
            None => None,
        };
        let disk_owned = match (&cfg.root, &cfg.start) {
            (Some(d), _) if d.overlay || d.hearth_made => true,
            (Some(_), Start::Incoming { mapped_ram: true, .. }) => true,
            _ => false,
        };
        let net = match &cfg.network {
            Some(egress) => {
                let ns = NetNs::create(&id, egress).map_err(BootError::Network)?;
                ns.set_rate(&cfg.limits).map_err(BootError::Network)?;
                Some(ns)
            }
            None => None,
        };
        let args = qemu::qemu_args(&cfg, accel, &id, &paths);
        tracing::debug!(?args, "starting QEMU");
        tracing::debug!(elapsed = ?started.elapsed(), "prepared (overlay, network)");
        let netns = net.as_ref().map(NetNs::path);
        if cfg.qemu_binary.is_absolute() && !cfg.qemu_binary.exists() {
            // Said as a missing QEMU (with the set-up command), before a jail is prepared
            // around it.
            let source = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(BootError::Spawn { binary: cfg.qemu_binary.clone(), source });
        }
        let (process, cgroup) = match &cfg.jail {
            None => (QemuProcess::spawn(&cfg.qemu_binary, &args, &paths.qemu_log, netns.as_deref(), cfg.detached), None),
            Some(j) => {
                let (prepared, binary) =
                    crate::jail::prepare(j, &cfg, accel, &dir_path, &paths, &cfg.qemu_binary).map_err(BootError::Jail)?;
                let p = QemuProcess::spawn_jailed(&prepared, &binary, &args, &paths.qemu_log, netns.as_deref(), cfg.detached);
                (p, Some(prepared.cgroup))
            }
        };
        let process = process.map_err(|source| BootError::Spawn { binary: cfg.qemu_binary.clone(), source })?;
        let record = VmRecord {
            version: crate::record::VERSION,
            id,
            accel,
            pid: process.pid(),
            disk,
            disk_owned,
            netns: net.as_ref().map(|n| n.name().to_owned()),
            egress: std::sync::Mutex::new(cfg.network.clone()),
            cfg,
        };
        record.write(&dir_path);
        crate::crash::point("vm.qemu-spawned");
        let cfg = &record.cfg;
        let console = ConsoleTap::start(&paths);

        let exited = |status: ExitStatus| BootError::Exited {
            status,
            qemu_log: file_tail(&paths.qemu_log, 10),
            console: console_report(&paths.console).1,
        };
        let deadline = started + cfg.boot_timeout;
        let mut qmp = None;
        let mut early_socket = None;
        if let Start::Incoming { state, mapped_ram } = &cfg.start {
            // Connect to the agent's port *before* the state loads: the saved guest believed
            // the host connected (the socket stays open through a capture), so connecting
            // first means the guest sees no change at all, and no stale "host gone" event
            // can reach the new connection. The guest's agent is waiting for a preface.
            while !paths.agent.exists() && process.exited().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            early_socket = std::os::unix::net::UnixStream::connect(&paths.agent).ok();
            let load = async {
                let mut qmp = Qmp::connect_retrying(&paths.qmp, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
                crate::migration::load(&mut qmp, state, *mapped_ram).await.map_err(|e| e.to_string())?;
                Ok(qmp)
            };
            let loaded = tokio::select! {
                r = load => r,
                s = process.exit_status() => Err(format!("QEMU exited while loading the state ({s})")),
                _ = tokio::time::sleep_until(deadline.into()) => Err("loading the snapshot timed out".to_owned()),
            };
            tracing::debug!(elapsed = ?started.elapsed(), "state loaded");
            match loaded {
                Ok(q) => qmp = Some(q),
                Err(reason) => {
                    let status = process.wait_exit(Duration::from_millis(500)).await;
                    return Err(BootError::Restore { reason, qemu_log: file_tail(&paths.qemu_log, 10), exited: status.is_some() });
                }
            }
        }
        let connect = async {
            if let Some(sock) = early_socket {
                let first = deadline.saturating_duration_since(Instant::now());
                match AgentClient::connect_stream(sock, first).await {
                    Ok(ok) => return Ok(ok),
                    Err(e) => tracing::debug!("handshake on the early socket failed ({e}); reconnecting"),
                }
            }
            // The socket appears once QEMU has parsed its arguments.
            while !paths.agent.exists() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            AgentClient::connect_retrying(&paths.agent, deadline.into()).await
        };
        let (agent, hello) = tokio::select! {
            r = connect => match r {
                Ok(ok) => ok,
                Err(AgentError::Timeout(_)) => {
                    return Err(BootError::Timeout {
                        timeout: cfg.boot_timeout,
                        accel,
                        console: file_tail(&paths.console, CONSOLE_TAIL_LINES),
                    })
                }
                Err(e) => {
                    // A connection that dies during boot usually means QEMU died.
                    if let Some(s) = process.wait_exit(Duration::from_secs(2)).await {
                        console.settle().await;
                        return Err(exited(s));
                    }
                    return Err(BootError::Agent(e));
                }
            },
            s = process.exit_status() => {
                console.settle().await;
                return Err(exited(s));
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                return Err(BootError::Timeout {
                    timeout: cfg.boot_timeout,
                    accel,
                    console: file_tail(&paths.console, CONSOLE_TAIL_LINES),
                })
            }
        };
        tracing::debug!(elapsed = ?started.elapsed(), "agent connected");
        if let Some(mut info) = restore {
            // The clock is read now, not when the restore began: loading can take seconds.
            info.unix_time_ns = crate::identity::now_ns();
            let fixed = tokio::select! {
                r = agent.restore(&info) => r.map_err(BootError::Fixups),
                s = process.exit_status() => {
                    console.settle().await;
                    Err(exited(s))
                }
                _ = tokio::time::sleep_until(deadline.into()) => Err(BootError::Fixups(AgentError::Timeout(cfg.boot_timeout))),
            };
            fixed?;
        }
        let boot_time = started.elapsed();
        tracing::info!(?boot_time, %accel, kernel = %hello.kernel, "VM ready");
        let vm = Vm {
            process,
            cgroup,
            net,
            agent,
            qmp: tokio::sync::Mutex::new(qmp),
            hello,
            paths,
            boot_time,
            _console: console,
            record,
            span,
            _dir: dir,
        };
        vm.persist();
        Ok(vm)
    }

    /// The VM's id (also its run directory's name).
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The caller's name for the VM ([`VmConfig::name`]), if it has one.
    pub fn name(&self) -> Option<&str> {
        self.record.cfg.name.as_deref()
    }

    /// The accelerator QEMU runs with.
    pub fn accel(&self) -> Accel {
        self.record.accel
    }

    /// From QEMU start to the agent's handshake.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// What the agent said in the handshake.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The VM's current egress policy, if it has a network.
    pub fn egress(&self) -> Option<Egress> {
        self.net.as_ref().and(self.record.egress())
    }

    /// Replaces the VM's egress policy while it runs (new connections see it at once).
    pub fn set_egress(&self, egress: &Egress) -> Result<(), VmError> {
        let ns = self.net.as_ref().ok_or(VmError::Network(crate::net::NetError::NoNetwork))?;
        // Held across the change, so the recorded policy is always the loaded one.
        let mut recorded = self.record.egress.lock().unwrap_or_else(|p| p.into_inner());
        ns.set_egress(egress)?;
        *recorded = Some(egress.clone());
        drop(recorded);
        self.persist();
        Ok(())
    }

    /// Freezes the disk's current contents: QEMU starts writing to a new qcow2 file
    /// `new_active` (created here, backed by the current file), and the current file —
    /// returned — is never written again, so it can serve as a read-only layer. The
    /// guest should `sync` first. The new file is Hearth's and moves with snapshots.
    pub async fn checkpoint_disk(&mut self, new_active: &Path) -> Result<PathBuf, VmError> {
        let current = self.record.disk.clone().ok_or_else(|| VmError::Invalid("the VM has no disk".into()))?;
        require_absolute(new_active)?;
        let (file, mode) = match self.record.cfg.jail {
            None => (new_active.to_path_buf(), "absolute-paths"),
            // A jailed QEMU cannot see `new_active`: the host creates it (backed by the
            // current file), gives it to QEMU's uid and links it into QEMU's `q/`, and QEMU
            // opens the link as an existing image (which it does without reading its
            // backing file name: the current image becomes its backing node).
            Some(_) => {
                let io = |e: std::io::Error| VmError::Invalid(format!("cannot prepare the layer {}: {e}", new_active.display()));
                qemu::create_overlay_uncached(&current, "qcow2", new_active).map_err(VmError::Invalid)?;
                let uid = crate::jail::uid_of(&self._dir.0).ok_or_else(|| io(std::io::Error::other("no jail uid")))?;
                std::os::unix::fs::chown(new_active, Some(uid), Some(uid)).map_err(io)?;
                let name = new_active.file_name().unwrap_or_default();
                let link = self._dir.0.join(crate::jail::QEMU_DIR).join(name);
                let _ = std::fs::remove_file(&link);
                std::fs::hard_link(new_active, &link).map_err(io)?;
                (link, "existing")
            }
        };
        self.qmp(
            "blockdev-snapshot-sync",
            Some(serde_json::json!({
                "device": "root",
                "snapshot-file": file.display().to_string(),
                "format": "qcow2",
                "mode": mode,
            })),
        )
        .await?;
        self.record.disk = Some(new_active.to_path_buf());
        self.record.disk_owned = true;
        self.persist();
        Ok(current)
    }

    /// The name of the VM's network namespace, if it has a network.
    pub fn netns(&self) -> Option<&str> {
        self.net.as_ref().map(NetNs::name)
    }

    /// The agent client.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Files of the run directory.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The console's last lines.
    pub fn console_tail(&self, lines: usize) -> String {
        file_tail(&self.paths.console, lines)
    }

    /// Turns an agent error into the VM-level cause: when the connection broke because the
    /// guest died, say so (waiting briefly for QEMU to finish exiting).
    pub async fn diagnose(&self, e: AgentError) -> VmError {
        if !e.is_disconnect() {
            return VmError::Agent(e);
        }
        match self.process.wait_exit(Duration::from_secs(3)).await {
            Some(status) => {
                self._console.settle().await;
                let (panicked, console) = console_report(&self.paths.console);
                if panicked {
                    VmError::GuestPanicked { console }
                } else {
                    VmError::Stopped { status, console }
                }
            }
            None => VmError::Agent(e),
        }
    }

    /// Runs a command to completion, collecting at most `max_output` bytes of output.
    pub async fn exec(&self, spec: &ExecRequest, stdin: Option<bytes::Bytes>, max_output: usize) -> Result<ExecOutput, VmError> {
        match self.agent.exec_collect(spec, stdin, max_output).await {
            Ok(o) => Ok(o),
            Err(e) => Err(self.diagnose(e).await),
        }
    }

    /// Starts a streaming exec.
    pub async fn exec_stream(&self, spec: &ExecRequest) -> Result<ExecStream, VmError> {
        match self.agent.exec(spec).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.diagnose(e).await),
        }
    }

    /// Drops the agent connection and makes a fresh one, as the host does after a snapshot
    /// restore; the agent must accept it.
    pub async fn reconnect(&mut self, timeout: Duration) -> Result<&Hello, VmError> {
        if let Err(e) = self.agent.detach(Duration::from_secs(2)).await {
            vm_event!(self, debug, "detach before reconnect failed: {e}");
        }
        self.agent.close();
        // The guest learns of the host's disconnect through a virtio-serial control
        // message handled asynchronously; reconnecting before it lands would let that stale
        // "host gone" end the new connection. Give it a moment (retries cover the rest).
        tokio::time::sleep(RECONNECT_SETTLE).await;
        let deadline = tokio::time::Instant::now() + timeout;
        let (agent, hello) = match AgentClient::connect_retrying(&self.paths.agent, deadline).instrument(self.span.clone()).await {
            Ok(ok) => ok,
            Err(e) => return Err(self.diagnose(e).await),
        };
        self.agent = agent;
        self.hello = hello;
        Ok(&self.hello)
    }

    /// True while QEMU runs.
    pub fn is_running(&self) -> bool {
        self.process.exited().is_none()
    }

    /// The VM's QMP session, connected on first use. A caller whose command fails with an
    /// error that [`breaks_session`] must drop the session (set it to `None`).
    pub(crate) async fn qmp_session(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Qmp>>, QmpError> {
        let mut guard = self.qmp.lock().await;
        if guard.is_none() {
            let connect = tokio::time::timeout(Duration::from_secs(10), Qmp::connect(&self.paths.qmp));
            *guard = Some(connect.await.map_err(|_| QmpError::Timeout("connect".into()))??);
        }
        Ok(guard)
    }

    /// Runs a QMP command (connecting on first use).
    pub async fn qmp(&self, command: &str, args: Option<serde_json::Value>) -> Result<serde_json::Value, QmpError> {
        let mut guard = self.qmp_session().await?;
        let qmp = guard.as_mut().expect("connected by qmp_session");
        let r = qmp.execute_timeout(command, args, Duration::from_secs(30)).await;
        if matches!(&r, Err(e) if breaks_session(e)) {
            *guard = None;
        }
        r
    }

    /// Stops the VM: asks the guest to power off (it syncs its disks), then QMP `quit`,
    /// then SIGKILL, each after a grace period. Returns how QEMU exited.
    pub async fn shutdown(mut self) -> ExitStatus {
        if self.process.exited().is_none() {
            let ask = tokio::time::timeout(Duration::from_secs(2), self.agent.shutdown()).await;
            if matches!(ask, Ok(Ok(()))) {
                if let Some(s) = self.process.wait_exit(Duration::from_secs(10)).await {
                    return s;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp("quit", None)).await;
            if let Some(s) = self.process.wait_exit(Duration::from_secs(3)).await {
                return s;
            }
        }
        self.process.kill().await
    }

    /// Kills QEMU at once.
    pub async fn kill(mut self) -> ExitStatus {
        self.process.kill().await
    }
}
