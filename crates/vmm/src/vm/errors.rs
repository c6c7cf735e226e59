//! What can go wrong with a VM, and the console lines that say why.

use super::*;

/// The console's last lines, led by the kernel's panic line when there is one (a panic's
/// backtrace is long and the line naming the cause would otherwise scroll out).
pub(crate) fn console_report(path: &Path) -> (bool, String) {
    let big = file_tail(path, 2000);
    let panic_line = big.lines().find(|l| l.contains("Kernel panic")).map(str::to_owned);
    let tail = file_tail(path, CONSOLE_TAIL_LINES);
    match panic_line {
        Some(l) if !tail.contains(&l) => (true, format!("{l}\n...\n{tail}")),
        Some(_) => (true, tail),
        None => (false, tail),
    }
}

/// A failure to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The configuration is invalid; nothing was started.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run directory could not be created.
    #[error("cannot create the VM's run directory {path}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A detached VM could not be taken back.
    #[error("cannot reattach the VM: {0}")]
    Reattach(String),
    /// The VM's network could not be set up.
    #[error("cannot set up the VM's network: {0}")]
    Network(crate::net::NetError),
    /// A unix socket path would be too long.
    #[error("run directory {0} is too deep for unix socket paths (108 bytes); set HEARTH_HOME to a shorter path")]
    PathTooLong(PathBuf),
    /// The root disk overlay could not be created.
    #[error("cannot create the root disk overlay: {0}")]
    Overlay(String),
    /// QEMU's jail could not be prepared (the host cannot jail: [`crate::jail::available`]).
    #[error("cannot jail QEMU: {0}")]
    Jail(crate::jail::JailError),
    /// QEMU could not be started.
    #[error("cannot start {binary}; install QEMU 10 with `{}`", crate::home::SETUP_COMMAND)]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before the agent answered.
    #[error("QEMU exited during boot ({status}){}\n--- QEMU ---\n{qemu_log}\n--- console ---\n{console}", panic_note(.console))]
    Exited {
        /// QEMU's exit status.
        status: ExitStatus,
        /// QEMU's stderr.
        qemu_log: String,
        /// The console's last lines.
        console: String,
    },
    /// The agent did not answer in time.
    #[error("the guest did not become ready within {timeout:?} (accelerator {accel}); console:\n{console}")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// The accelerator used.
        accel: Accel,
        /// The console's last lines.
        console: String,
    },
    /// The agent answered wrongly.
    #[error("the guest agent failed its handshake")]
    Agent(#[source] AgentError),
    /// QEMU could not load the snapshot; nothing ran.
    #[error("restoring the snapshot failed: {reason}{}\n--- QEMU ---\n{qemu_log}", if *.exited { " (QEMU exited)" } else { "" })]
    Restore {
        /// What went wrong.
        reason: String,
        /// QEMU's stderr.
        qemu_log: String,
        /// Whether QEMU had exited.
        exited: bool,
    },
    /// The snapshot itself is unusable.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The guest did not take its after-restore clock, entropy and identity.
    #[error("the restored guest did not apply its clock, entropy and identity")]
    Fixups(#[source] AgentError),
}

impl BootError {
    /// True when the failure happened before the guest ran any instruction (nothing on its
    /// disk can have changed).
    pub fn guest_never_ran(&self) -> bool {
        matches!(
            self,
            BootError::Config(_)
                | BootError::RunDir { .. }
                | BootError::PathTooLong(_)
                | BootError::Overlay(_)
                | BootError::Jail(_)
                | BootError::Spawn { .. }
                | BootError::Restore { .. }
                | BootError::Snapshot(_)
        )
    }
}

fn panic_note(console: &str) -> &'static str {
    if console.contains("Kernel panic") {
        ": the guest kernel panicked"
    } else {
        ""
    }
}

/// A failure of a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The guest kernel panicked (QEMU exited).
    #[error("the guest kernel panicked; console:\n{console}")]
    GuestPanicked {
        /// The console's last lines.
        console: String,
    },
    /// QEMU exited for another reason.
    #[error("the VM stopped ({status}); console:\n{console}")]
    Stopped {
        /// QEMU's exit status.
        status: ExitStatus,
        /// The console's last lines.
        console: String,
    },
    /// The agent failed while the VM still runs.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The request does not fit this VM.
    #[error("{0}")]
    Invalid(String),
    /// The VM's network refused the change.
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
}
