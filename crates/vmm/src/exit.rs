//! How a VM's QEMU ended, for whoever holds the VM and must tell its user: a watch that
//! wakes when QEMU exits (without holding the VM, so a watcher never keeps it busy) and a
//! report of the exit (signal or code, and the console's last lines).

use crate::vm::Vm;
use std::process::ExitStatus;
use tokio::sync::watch;

/// How QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It is gone, how is not knowable: it was adopted ([`Vm::reattach`]) and only its
    /// parent could read its status.
    Unknown,
}

impl QemuExit {
    /// The exit of a process this one waited for.
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => QemuExit::Code(c),
            (None, Some(s)) => QemuExit::Signal(s),
            (None, None) => QemuExit::Unknown,
        }
    }
}

impl std::fmt::Display for QemuExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            QemuExit::Code(c) => write!(f, "QEMU exited with code {c}"),
            QemuExit::Signal(s) => write!(f, "QEMU was killed by signal {s} ({})", signal_name(s)),
            QemuExit::Unknown => {
                write!(f, "QEMU exited (its exit status is not knowable: the daemon adopted it after a restart)")
            }
        }
    }
}

/// `SIGKILL` for 9, and so on (the signals that end processes).
fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGPIPE => "SIGPIPE",
        _ => "a signal",
    }
}

/// Wakes when a VM's QEMU exits ([`Vm::exit_watch`]).
pub struct ExitWatch {
    rx: watch::Receiver<Option<ExitStatus>>,
    adopted: bool,
}

impl ExitWatch {
    /// Waits until QEMU exits and says how; `None` when the VM was released instead
    /// ([`Vm::release`]: QEMU runs on, this process no longer watches it).
    pub async fn exited(mut self) -> Option<QemuExit> {
        let status = (*self.rx.wait_for(Option::is_some).await.ok()?)?;
        Some(if self.adopted { QemuExit::Unknown } else { QemuExit::from_status(status) })
    }
}

/// Why a VM stopped, as its user should read it.
#[derive(Debug, Clone)]
pub struct ExitReport {
    /// How QEMU ended.
    pub exit: QemuExit,
    /// Whether the console shows a kernel panic.
    pub panicked: bool,
    /// The console's last lines (led by the panic line when there is one).
    pub console: String,
}

impl ExitReport {
    /// The report in at most `max` bytes: how QEMU ended, then as many of the console's
    /// last lines as fit (the newest are kept).
    pub fn summary(&self, max: usize) -> String {
        let mut head = self.exit.to_string();
        if self.panicked {
            head.push_str("; the guest kernel panicked");
        }
        let console = self.console.trim();
        if console.is_empty() || head.len() + 32 > max {
            return truncate(head, max);
        }
        let room = max - head.len() - "; console's last lines:\n".len();
        let mut kept: Vec<&str> = Vec::new();
        let mut used = 0;
        for line in console.lines().rev() {
            if used + line.len() + 1 > room {
                break;
            }
            used += line.len() + 1;
            kept.push(line);
        }
        if kept.is_empty() {
            return head;
        }
        kept.reverse();
        format!("{head}; console's last lines:\n{}", kept.join("\n"))
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl Vm {
    /// A watch on QEMU's exit that does not hold the VM.
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch { rx: self.process.exit_receiver(), adopted: self.process.adopted() }
    }

    /// Why QEMU is gone (waiting briefly for the console's last output); `None` while it runs.
    pub async fn exit_report(&self) -> Option<ExitReport> {
        let status = self.process.exited()?;
        self._console.settle().await;
        let (panicked, console) = crate::vm::console_report(&self.paths.console);
        let exit = if self.process.adopted() { QemuExit::Unknown } else { QemuExit::from_status(status) };
        Some(ExitReport { exit, panicked, console })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exits_read_as_signal_or_code() {
        assert_eq!(QemuExit::from_status(ExitStatus::from_raw(9)), QemuExit::Signal(9));
        assert_eq!(QemuExit::from_status(ExitStatus::from_raw(3 << 8)), QemuExit::Code(3));
        assert_eq!(QemuExit::Signal(9).to_string(), "QEMU was killed by signal 9 (SIGKILL)");
        assert_eq!(QemuExit::Code(1).to_string(), "QEMU exited with code 1");
    }

    #[test]
    fn a_summary_keeps_the_newest_console_lines_within_its_limit() {
        let console: String = (0..500).map(|i| format!("line {i}\n")).collect();
        let r = ExitReport { exit: QemuExit::Signal(9), panicked: false, console };
        let s = r.summary(2048);
        assert!(s.len() <= 2048, "{}", s.len());
        assert!(s.starts_with("QEMU was killed by signal 9 (SIGKILL); console's last lines:\n"), "{s}");
        assert!(s.ends_with("line 499"), "{s}");
        assert!(!s.contains("line 0\n"));
        let quiet = ExitReport { exit: QemuExit::Code(1), panicked: true, console: " \n".into() };
        assert_eq!(quiet.summary(2048), "QEMU exited with code 1; the guest kernel panicked");
        assert!(quiet.summary(10).len() <= 10);
    }
}
