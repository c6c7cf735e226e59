//! Warm pools: VMs already restored from a template, warmed, and paused until claimed.
//!
//! A launch from a template still pays for starting QEMU, loading device state and the
//! guest's first steps. A pool does that ahead of time: each pooled VM is launched, runs
//! one throwaway exec (so the exec path's pages are touched and its code translated), and
//! is paused (vCPUs stopped: no CPU used). Claiming one resumes its vCPUs and gives it a
//! fresh clock, entropy and identity, which is a couple of agent round trips. The pool
//! refills itself in the background; when it is empty a claim launches directly.

use crate::restore::{fresh_identity, RestoreOptions};
use crate::snapshot::Snapshot;
use crate::vm::{BootError, Vm};
use hearth_proto::exec::ExecRequest;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{Mutex, Notify};

/// A pool of paused, warmed VMs of one template.
pub struct Pool {
    inner: Arc<Inner>,
    refill: tokio::task::JoinHandle<()>,
}

struct Inner {
    snapshot: Snapshot,
    opts: RestoreOptions,
    size: usize,
    ready: Mutex<VecDeque<Vm>>,
    wake: Notify,
}

impl Pool {
    /// A pool of `size` VMs of `snapshot`, filled in the background.
    pub fn new(snapshot: Snapshot, opts: RestoreOptions, size: usize) -> Pool {
        let inner = Arc::new(Inner { snapshot, opts, size, ready: Mutex::new(VecDeque::new()), wake: Notify::new() });
        let i = inner.clone();
        let refill = tokio::spawn(async move {
            loop {
                let have = i.ready.lock().await.len();
                if have >= i.size {
                    i.wake.notified().await;
                    continue;
                }
                match warm(&i.snapshot, &i.opts).await {
                    Ok(vm) => i.ready.lock().await.push_back(vm),
                    Err(e) => {
                        tracing::warn!("warm pool launch failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Pool { inner, refill }
    }

    /// Waits until the pool holds its full size.
    pub async fn wait_full(&self) {
        while self.inner.ready.lock().await.len() < self.inner.size {
            self.inner.wake.notify_one();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// VMs ready to claim.
    pub async fn available(&self) -> usize {
        self.inner.ready.lock().await.len()
    }

    /// A running VM: from the pool when one is ready, else launched now.
    pub async fn claim(&self) -> Result<Vm, BootError> {
        let pooled = self.inner.ready.lock().await.pop_front();
        self.inner.wake.notify_one();
        let Some(vm) = pooled else {
            return Vm::launch(&self.inner.snapshot, &self.inner.opts).await;
        };
        wake(&vm).await?;
        Ok(vm)
    }
}

/// Wakes a VM [`warm`] paused: its vCPUs run again, with a fresh clock and entropy.
///
/// The VM got its own entropy and identity when it was launched into the pool and was
/// never handed out since; only its clock stood still while paused. The entropy is
/// refreshed anyway (cheap), hostname and machine-id are kept (a file write).
///
/// # Errors
///
/// QEMU refused to continue, or the agent to take the new clock and entropy.
pub async fn wake(vm: &Vm) -> Result<(), BootError> {
    vm.qmp("cont", None).await.map_err(|e| BootError::Restore {
        reason: format!("resuming a pooled VM: {e}"),
        qemu_log: String::new(),
        exited: !vm.is_running(),
    })?;
    let mut info = fresh_identity(vm.id().to_owned());
    info.hostname = None;
    info.machine_id = None;
    vm.agent().restore(&info).await.map_err(BootError::Fixups)?;
    Ok(())
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.refill.abort();
        // Pooled VMs are killed as they drop with the queue.
    }
}

/// Launches, warms and pauses one VM.
///
/// # Errors
///
/// The launch's, the warming exec's, or QEMU refusing to pause.
pub async fn warm(snapshot: &Snapshot, opts: &RestoreOptions) -> Result<Vm, BootError> {
    let vm = Vm::launch(snapshot, opts).await?;
    vm.agent().exec_collect(&ExecRequest::argv(["true"]), None, 1 << 16).await.map_err(BootError::Agent)?;
    vm.qmp("stop", None).await.map_err(|e| BootError::Restore {
        reason: format!("pausing a pooled VM: {e}"),
        qemu_log: String::new(),
        exited: !vm.is_running(),
    })?;
    Ok(vm)
}
