//! Reaping children, as PID 1 must.
//!
//! Every process whose parent dies is re-parented to PID 1, so the agent reaps with
//! `waitpid(-1)`. Execs it started itself register their pid; their status goes to the
//! waiting exec, everything else is discarded. The registry lock is held across `spawn` and
//! across each reaping pass, so a child that dies before it is registered is still matched,
//! and std's own wait for a child whose `exec` failed never races our `waitpid(-1)`.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// The registry of children waited for.
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
}

impl Reaper {
    /// Starts the reaping task on the current runtime.
    pub fn start() -> Arc<Reaper> {
        let reaper = Arc::new(Reaper { waiting: Mutex::new(HashMap::new()) });
        let r = reaper.clone();
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).expect("SIGCHLD handler");
        tokio::spawn(async move {
            loop {
                r.reap();
                if sig.recv().await.is_none() {
                    break;
                }
            }
        });
        reaper
    }

    /// Spawns a command and registers it; the receiver yields its exit.
    pub fn spawn(&self, cmd: &mut std::process::Command) -> std::io::Result<(std::process::Child, oneshot::Receiver<Exit>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn reap(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            if let Some(tx) = waiting.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }
}
