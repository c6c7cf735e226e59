//! What the daemon did not ask for: a QEMU that exits on its own, and the expected
//! failures of suspend and resume, each told to the user as the model's error and a
//! `stateReason` that says what happened and what to do.
//!
//! Every VM put in a slot ([`Service::hold`]) gets a watcher: a task that waits on QEMU's
//! exit (the pidfd the VM already holds, through its exit watch — it does not hold the VM,
//! so it never counts as busy). When QEMU exits it takes the slot's lock; if the slot
//! still holds *that* VM, nobody stopped it on purpose (suspend, terminate and release
//! take the VM out of the slot under the lock before QEMU ends, and a release closes the
//! watch without an exit), so the microvm goes to TERMINATED through `transition()` with
//! how QEMU ended and the console's last lines, its usage closes, and its run directory,
//! namespace and files go.

use super::microvms::{sole, Slot};
use super::{Reason, Service};
use crate::error::{ApiError, Kind};
use crate::lifecycle::{Lifecycle, MicrovmState};
use crate::store::MicrovmRecord;
use hearth_vmm::{BootError, QemuExit, SnapshotError, Vm};
use std::sync::Arc;
use std::time::Duration;

/// The model's limit on `stateReason` (`NonBlankString`, 2048).
pub(super) const MAX_REASON: usize = 2048;

/// How long a crashed VM's execs and connections get to let go before they are ended.
const CRASH_DRAIN: Duration = Duration::from_secs(2);

/// Seconds a client is told to wait before retrying what the host could not do now.
const RETRY_AFTER: u64 = 60;

/// `s` cut to the model's `stateReason` limit.
pub(super) fn bounded(mut s: String) -> String {
    if s.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// True when `e` or one of its causes is the filesystem being full (ENOSPC, EDQUOT), or
/// QEMU saying so.
pub(super) fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) || io.kind() == std::io::ErrorKind::StorageFull {
                return true;
            }
        }
        let text = c.to_string();
        if text.contains("No space left on device") || text.contains("Disk quota exceeded") {
            return true;
        }
        cur = c.source();
    }
    false
}

/// A suspend that failed while the VM ran on: the reason the microvm (RUNNING) records
/// and the error SuspendMicrovm answers. SuspendMicrovm's model has no capacity error, so
/// a full disk is its InternalServerException, saying so, with `retryAfterSeconds`.
pub(super) fn suspend_error(id: &str, e: &SnapshotError) -> (String, ApiError) {
    if out_of_space(e) {
        tracing::warn!(microvm = %id, error = %e, "suspend refused: no room for the saved state");
        let msg = format!(
            "microvm {id} was not suspended: the host does not have the disk space to save its state. \
             It keeps RUNNING; retry the suspend once the host's operator has freed space, or terminate it"
        );
        return (msg.clone(), ApiError::unavailable(msg, RETRY_AFTER));
    }
    let reason = bounded(format!("suspend failed, the VM runs on: {e}"));
    let msg = format!("microvm {id} was not suspended; it keeps RUNNING (GetMicrovm's stateReason says why); retry the suspend");
    tracing::warn!(microvm = %id, error = %e, "suspend failed");
    (reason, ApiError::unavailable(msg, RETRY_AFTER))
}

/// Why a resume did not happen, by where it failed.
pub(super) enum ResumeFailure {
    /// The saved state could not be opened or verified.
    Open(SnapshotError),
    /// The VM could not be started from it.
    Start(BootError),
}

/// What a failed resume does to the microvm: the state it moves to (`None`: it stays
/// SUSPENDED), the reason it records, and the error ResumeMicrovm answers.
pub(super) fn resume_outcome(id: &str, f: &ResumeFailure) -> (Option<MicrovmState>, String, ApiError) {
    match f {
        // Damaged (or missing) files: no resume can ever use them.
        ResumeFailure::Open(e @ SnapshotError::Invalid { .. }) => {
            let reason = bounded(format!("its saved state is damaged and cannot be resumed ({e}); run a new microvm"));
            let msg = format!("microvm {id} cannot be resumed: its saved state is damaged; it is now TERMINATED (see its stateReason)");
            (Some(MicrovmState::Terminated), reason, ApiError::conflict("Microvm", id, msg))
        }
        ResumeFailure::Open(e @ SnapshotError::Version { .. }) => {
            let reason =
                bounded(format!("its saved state is of another Hearth version ({e}); resume it with that version, or terminate it"));
            (None, reason.clone(), ApiError::conflict("Microvm", id, format!("microvm {id} cannot be resumed by this Hearth: {reason}")))
        }
        ResumeFailure::Open(e) => {
            tracing::warn!(microvm = %id, error = %e, "resume: the saved state could not be read");
            let reason = bounded(format!("resume failed: its saved state could not be read ({e}); it stays SUSPENDED, retry the resume"));
            let msg = format!("microvm {id} was not resumed: its saved state could not be read; it stays SUSPENDED, retry");
            (None, reason, ApiError::unavailable(msg, RETRY_AFTER))
        }
        // Nothing ran: the saved state is intact (the manifest is back in place).
        ResumeFailure::Start(e) if e.guest_never_ran() => {
            let reason = bounded(format!("resume failed before the guest ran; its saved state is intact, retry the resume: {e}"));
            let err = match e {
                // The host cannot take this snapshot as it is (another QEMU, another kind).
                BootError::Snapshot(_) => ApiError::conflict("Microvm", id, format!("microvm {id} cannot be resumed on this host: {e}")),
                _ if out_of_space(e) => ApiError::unavailable(
                    format!("microvm {id} was not resumed: the host is out of disk space; it stays SUSPENDED, retry later"),
                    RETRY_AFTER,
                ),
                _ => ApiError::unavailable(
                    format!("microvm {id} was not resumed; it stays SUSPENDED (its stateReason says why), retry"),
                    RETRY_AFTER,
                ),
            };
            (None, reason, err)
        }
        // The guest ran from the saved state, which is retired: it cannot be resumed again.
        ResumeFailure::Start(e) => {
            let reason = bounded(format!("the resumed guest failed to start: {e}"));
            let msg = format!("microvm {id}'s resumed guest failed to start; it is now TERMINATED (see its stateReason)");
            (Some(MicrovmState::Terminated), reason, ApiError::new(Kind::Internal, msg))
        }
    }
}

impl Service {
    /// Puts `vm` in microvm `m`'s slot (`guard`, its lock held) and watches its QEMU: an
    /// exit nobody asked for terminates the microvm ([`Self::qemu_exited`]).
    pub(super) fn hold(&self, guard: &mut Slot, vm: Vm, m: &MicrovmRecord) {
        let watch = vm.exit_watch();
        let vm_id = vm.id().to_owned();
        self.imds_start(guard, &vm, m);
        guard.vm = Some(Arc::new(vm));
        let (me, slot) = (self.me.clone(), self.slot(&m.microvm_id));
        let (account, id) = (m.account.clone(), m.microvm_id.clone());
        tokio::spawn(async move {
            // `None`: released (the daemon's graceful stop); QEMU runs on.
            let Some(exit) = watch.exited().await else { return };
            if let Some(svc) = me.upgrade() {
                svc.qemu_exited(&slot, &account, &id, &vm_id, exit).await;
            }
        });
    }

    /// QEMU of VM `vm_id` (microvm `id`) exited: unless the daemon stopped it on purpose
    /// (then the slot no longer holds it), the microvm becomes TERMINATED with how QEMU
    /// ended and the console's last lines, and what is left of it goes.
    async fn qemu_exited(&self, slot: &tokio::sync::Mutex<Slot>, account: &str, id: &str, vm_id: &str, exit: QemuExit) {
        let mut guard = slot.lock().await;
        let Some(vm) = guard.vm.as_ref().filter(|v| v.id() == vm_id) else { return };
        let prefix = "the VM stopped unexpectedly: ";
        let report = match vm.exit_report().await {
            Some(r) => r.summary(MAX_REASON - prefix.len()),
            None => exit.to_string(),
        };
        let reason = format!("{prefix}{report}");
        tracing::warn!(microvm = %id, %exit, "QEMU exited on its own; the microvm is TERMINATED");
        self.metrics.error("qemu-exit");
        // Execs and connections on it end; dropping the VM removes its namespace and run
        // directory.
        if sole(&mut guard, CRASH_DRAIN, true).await.is_none() {
            drop(guard.vm.take());
        }
        // The microvm ends: so do its relay and its credentials.
        self.imds_end(&mut guard, id).await;
        guard.cpu = None;
        match self.store.microvm(account, id).await {
            Ok(Some(mut m)) if m.state.valid_transition(MicrovmState::Terminated) => {
                let _ = std::fs::remove_dir_all(self.microvm_dir(id));
                if let Err(e) = self.transition(&mut m, MicrovmState::Terminated, Reason::Set(Some(reason))).await {
                    tracing::error!(microvm = %id, error = %e, "recording a QEMU exit");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(microvm = %id, error = %e, "reading the microvm of an exited QEMU"),
        }
        drop(guard);
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// A suspend that failed: a VM still running goes back to its slot and the microvm to
    /// RUNNING; a VM that is gone ends the microvm (TERMINATED, with how QEMU ended). The
    /// error SuspendMicrovm answers.
    pub(super) async fn suspend_failed(&self, guard: &mut Slot, m: &mut MicrovmRecord, vm: Vm, e: SnapshotError) -> ApiError {
        let id = m.microvm_id.clone();
        if vm.is_running() {
            let (reason, err) = suspend_error(&id, &e);
            // Its relay was stopped before the snapshot: the VM runs on, so does it.
            guard.imds = None;
            self.imds_start(guard, &vm, m);
            guard.vm = Some(Arc::new(vm));
            if let Err(t) = self.transition(m, MicrovmState::Running, Reason::Set(Some(reason))).await {
                return t;
            }
            return err;
        }
        let report = match vm.exit_report().await {
            Some(r) => r.summary(MAX_REASON - 64),
            None => e.to_string(),
        };
        drop(vm);
        let _ = std::fs::remove_dir_all(self.microvm_dir(&id));
        let reason = bounded(format!("the VM stopped before it could be suspended: {report}"));
        if let Err(t) = self.transition(m, MicrovmState::Terminated, Reason::Set(Some(reason))).await {
            return t;
        }
        ApiError::conflict("Microvm", &id, format!("microvm {id}'s VM had stopped; it is now TERMINATED (see its stateReason)"))
    }

    /// A resume that failed: the microvm stays SUSPENDED or ends, as
    /// [`resume_outcome`] says, with a reason; the error ResumeMicrovm answers.
    pub(super) async fn resume_failed(&self, m: &mut MicrovmRecord, f: ResumeFailure) -> ApiError {
        let (to, reason, err) = resume_outcome(&m.microvm_id, &f);
        let moved = match to {
            Some(to) => {
                let _ = std::fs::remove_dir_all(self.microvm_dir(&m.microvm_id));
                self.transition(m, to, Reason::Set(Some(reason))).await
            }
            None => {
                m.state_reason = Some(reason);
                self.put(m).await
            }
        };
        moved.err().unwrap_or(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> SnapshotError {
        SnapshotError::Io {
            what: "not enough space at /srv/hearth: a suspend of this VM may need 576 MiB, 3 MiB are free".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }

    #[test]
    fn a_full_disk_is_told_as_such_with_a_retry_and_no_host_path() {
        let (reason, e) = suspend_error("mvm-1", &enospc());
        assert_eq!((e.kind, e.status(), e.retry_after), (Kind::Internal, 500, Some(RETRY_AFTER)));
        assert!(e.message.contains("disk space") && e.message.contains("keeps RUNNING"), "{}", e.message);
        assert!(!e.message.contains("/srv") && !reason.contains("/srv"), "no host paths: {reason}");
        assert!(!e.message.contains("internal error #"), "not the opaque message");
        // QEMU's own words, deep in a chain, count too.
        assert!(out_of_space(&SnapshotError::Qemu("write failed: No space left on device".into())));
        assert!(!out_of_space(&SnapshotError::Qemu("migration failed".into())));
        let (reason, e) = suspend_error("mvm-1", &SnapshotError::Qemu("migration failed".into()));
        assert_eq!(e.status(), 500);
        assert!(reason.contains("migration failed") && e.message.contains("keeps RUNNING"), "{reason}");
    }

    #[test]
    fn a_damaged_snapshot_ends_the_microvm_with_a_reason_and_a_409() {
        let damaged =
            ResumeFailure::Open(SnapshotError::Invalid { path: "/x/suspended".into(), reason: "state.bin checksum differs".into() });
        let (to, reason, e) = resume_outcome("mvm-1", &damaged);
        assert_eq!(to, Some(MicrovmState::Terminated));
        assert!(reason.contains("damaged") && reason.contains("checksum"), "{reason}");
        assert_eq!((e.kind, e.status()), (Kind::Conflict, 409));
        assert_eq!(e.resource, Some(("Microvm".into(), "mvm-1".into())));

        let io =
            ResumeFailure::Open(SnapshotError::Io { what: "read manifest".into(), source: std::io::Error::from_raw_os_error(libc::EIO) });
        let (to, reason, e) = resume_outcome("mvm-1", &io);
        assert_eq!((to, e.status(), e.retry_after), (None, 500, Some(RETRY_AFTER)));
        assert!(reason.contains("stays SUSPENDED"), "{reason}");

        let other_qemu = ResumeFailure::Start(BootError::Snapshot(SnapshotError::Invalid {
            path: "/x".into(),
            reason: "it was taken with QEMU 9; this host runs QEMU 10".into(),
        }));
        let (to, reason, e) = resume_outcome("mvm-1", &other_qemu);
        assert_eq!((to, e.status()), (None, 409));
        assert!(reason.contains("intact") && reason.contains("QEMU 10"), "{reason}");

        let ran = ResumeFailure::Start(BootError::Fixups(hearth_vmm::AgentError::Timeout(Duration::from_secs(1))));
        let (to, reason, _) = resume_outcome("mvm-1", &ran);
        assert_eq!(to, Some(MicrovmState::Terminated));
        assert!(!reason.is_empty());
    }

    #[test]
    fn reasons_fit_the_model() {
        let long = "x".repeat(5000);
        assert_eq!(bounded(long).len(), MAX_REASON);
        let (_, reason, _) =
            resume_outcome("mvm-1", &ResumeFailure::Open(SnapshotError::Invalid { path: "/x".into(), reason: "é".repeat(3000) }));
        assert!(reason.len() <= MAX_REASON);
    }

    #[test]
    fn a_vm_that_stopped_under_an_exec_is_a_conflict() {
        use std::os::unix::process::ExitStatusExt;
        let e: ApiError = hearth_vmm::VmError::Stopped { status: std::process::ExitStatus::from_raw(9), console: String::new() }.into();
        assert_eq!((e.kind, e.status()), (Kind::Conflict, 409));
        assert!(e.message.contains("signal 9"), "{}", e.message);
        let e: ApiError = hearth_vmm::VmError::GuestPanicked { console: "Kernel panic".into() }.into();
        assert_eq!(e.status(), 409);
    }
}
