//! On start: what the previous daemon left (builds cut off, VMs to reattach, operations a
//! crash cut in half, microvms lost) is brought to a state the lifecycle allows.
//!
//! The daemon listens first. [`Service::prepare_recovery`] (before the listener answers:
//! a few queries) fails the builds cut off and marks every live microvm as being
//! recovered; [`Service::recover`] then settles them in the background, all at once, each
//! under its slot's lock. Until a microvm is settled, GetMicrovm answers its last recorded
//! state and every call that would change it (through `locked`) a ConflictException.
//!
//! Each operation leaves records in the order it acts (docs/RELIABILITY.md), and each
//! state is settled from them:
//! - RUNNING: reattached (its vCPUs continued: a fork's source may have been stopped
//!   mid-copy); a resume that had recorded RUNNING but not yet deleted the saved state has
//!   it deleted now. A VM that cannot be reattached: TERMINATED.
//! - SUSPENDING: forward to SUSPENDED when a complete, verified snapshot exists (QEMU
//!   killed), else back to RUNNING (disk put back, partial files removed, QEMU's vCPUs
//!   continued, reattached); TERMINATED only when QEMU is gone too.
//! - SUSPENDED with a resume under way (its manifest retired): forward to RUNNING when the
//!   new QEMU is up and its guest answers, else back (QEMU killed, manifest restored) when
//!   the guest never ran; a guest that ran and is gone leaves a snapshot older than its
//!   disk: TERMINATED with that reason. Without a resume under way: SUSPENDED if the
//!   snapshot opens, any QEMU started for it killed.
//! - PENDING (RunMicrovm cut off; its caller never got the id) and TERMINATING: finished
//!   as TERMINATED, their VM and files removed.

use super::microvms::Slot;
use super::{Reason, Service};
use crate::error::ApiError;
use crate::lifecycle::{MicrovmImageState, MicrovmImageVersionState as VersionState, MicrovmState};
use crate::store::MicrovmRecord;
use hearth_vmm::{recover, Vm};
use std::path::PathBuf;

impl Service {
    /// Reconciles at once (tests, tools): [`Service::prepare_recovery`], then
    /// [`Service::recover`].
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        let live = self.prepare_recovery().await?;
        self.recover(live).await;
        Ok(())
    }

    /// Before the API answers: builds cut off by the stop become FAILED (their partial
    /// files removed), and every live microvm is marked as being recovered. Returns them,
    /// for [`Service::recover`].
    pub async fn prepare_recovery(&self) -> Result<Vec<MicrovmRecord>, ApiError> {
        // Plain views of keyed templates a crash left (template_crypt): made again on use.
        self.drop_all_template_views();
        for mut v in self.store.unfinished_versions().await? {
            let _ = std::fs::remove_dir_all(self.version_dir(&v.account, &v.name, v.version));
            let why = "the build was interrupted by a daemon restart; UpdateMicrovmImage builds again";
            // Credentials its builder was issued end with it.
            self.end_build_sessions(super::imds::build_subject(&v)).await;
            self.version_transition(&mut v, VersionState::Failed, Reason::Set(Some(why.into()))).await?;
            if let Some(mut i) = self.store.image(&v.account, &v.name).await? {
                match i.state {
                    MicrovmImageState::Creating => self.image_transition(&mut i, MicrovmImageState::CreateFailed).await?,
                    MicrovmImageState::Updating => self.image_transition(&mut i, MicrovmImageState::UpdateFailed).await?,
                    _ => {}
                }
            }
        }
        let live = self.store.live_microvms().await?;
        self.recovering.lock().unwrap_or_else(|p| p.into_inner()).extend(live.iter().map(|m| m.microvm_id.clone()));
        Ok(live)
    }

    /// Settles the microvms [`Service::prepare_recovery`] marked, concurrently (each is
    /// bounded: no agent is waited on for more than a few seconds), then kills detached
    /// VMs no record owns and removes run directories whose QEMU is gone.
    pub async fn recover(&self, live: Vec<MicrovmRecord>) {
        let started = std::time::Instant::now();
        let n = live.len();
        futures_util::future::join_all(live.into_iter().map(|m| async move {
            let id = m.microvm_id.clone();
            let slot = self.slot(&id);
            let mut guard = slot.lock().await;
            let account = m.account.clone();
            // Encrypted suspended files are settled in plain form, then encrypted again.
            self.unseal_for_recovery(&m).await;
            if let Err(e) = self.settle(&mut guard, m).await {
                tracing::warn!(microvm = %id, error = %e.message, "could not settle a microvm after the restart");
            }
            self.reseal_after_recovery(&account, &id).await;
            self.recovering.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }))
        .await;
        // Detached VMs nobody reattached (a crash between their start and their record, or
        // one an interrupted operation left) are killed; then run directories whose QEMU is
        // gone go. VMs this daemon holds keep their lock and are left alone.
        hearth_vmm::vm::kill_unowned_detached(&self.vm_template.run_root);
        hearth_vmm::vm::sweep_stale_run_dirs(&self.vm_template.run_root);
        tracing::info!(microvms = n, elapsed = ?started.elapsed(), "recovered after the restart");
    }

    /// ConflictException while microvm `id` waits for the start-up reconcile.
    pub(super) fn check_not_recovering(&self, id: &str) -> Result<(), ApiError> {
        if self.recovering.lock().unwrap_or_else(|p| p.into_inner()).contains(id) {
            return Err(ApiError::conflict("Microvm", id, format!("microvm {id} is being recovered after a restart; retry shortly")));
        }
        Ok(())
    }

    /// Brings one microvm to a state that matches what is on this host (module docs).
    async fn settle(&self, guard: &mut Slot, mut m: MicrovmRecord) -> Result<(), ApiError> {
        let id = m.microvm_id.clone();
        let suspended = self.microvm_dir(&id).join("suspended");
        let vm_dir = m.vm_dir.as_deref().map(PathBuf::from);
        // Any QEMU started for it: the recorded one, and one whose record never got written.
        let mut candidates: Vec<PathBuf> = vm_dir.iter().cloned().collect();
        for d in recover::find_detached(&self.vm_template.run_root, &id) {
            if !candidates.contains(&d) {
                candidates.push(d);
            }
        }
        let lost = match m.state {
            MicrovmState::Running => match &vm_dir {
                // Continuing: a fork cut off by the crash leaves its source RUNNING but
                // stopped mid-copy (`cont` is a no-op for a VM that runs).
                Some(d) => match Vm::reattach_continuing(d).await {
                    Ok(vm) => {
                        self.hold(guard, vm, &m);
                        if recover::resume_under_way(&suspended) {
                            // RUNNING was recorded; only the saved state's removal was left.
                            hearth_vmm::restore::finish_resume(&suspended);
                        }
                        let others: Vec<PathBuf> = candidates.iter().filter(|c| Some(*c) != vm_dir.as_ref()).cloned().collect();
                        discard_all(&others).await;
                        return Ok(());
                    }
                    Err(e) => format!("lost while the daemon was down: {e}"),
                },
                None => "RUNNING without a recorded VM when the previous Hearth daemon stopped".into(),
            },
            MicrovmState::Suspending => match recover::settle_suspend(&suspended, vm_dir.as_deref()) {
                Ok(_) => {
                    discard_all(&candidates).await;
                    m.vm_dir = None;
                    return self.transition(&mut m, MicrovmState::Suspended, Reason::Keep).await;
                }
                Err(why) => match &vm_dir {
                    Some(d) => match Vm::reattach_continuing(d).await {
                        Ok(vm) => {
                            self.hold(guard, vm, &m);
                            let reason = format!("a suspend was interrupted by a daemon restart ({why}); the microvm runs on");
                            return self.transition(&mut m, MicrovmState::Running, Reason::Set(Some(reason))).await;
                        }
                        Err(e) => format!("a suspend was interrupted by a daemon restart ({why}) and the VM could not be continued: {e}"),
                    },
                    None => format!("a suspend was interrupted by a daemon restart ({why}) and no VM was recorded"),
                },
            },
            MicrovmState::Suspended if recover::resume_under_way(&suspended) => {
                let mut ran = None;
                for c in &candidates {
                    if !recover::guest_ran(c).await {
                        recover::discard(c).await;
                        continue;
                    }
                    match Vm::reattach(c).await {
                        Ok(vm) => {
                            // Forward: the resumed VM runs and answers.
                            m.vm_dir = Some(c.display().to_string());
                            self.put(&m).await?;
                            self.hold(guard, vm, &m);
                            guard.cpu = None;
                            self.transition(&mut m, MicrovmState::Running, Reason::Set(None)).await?;
                            hearth_vmm::restore::finish_resume(&suspended);
                            let others: Vec<PathBuf> = candidates.iter().filter(|o| *o != c).cloned().collect();
                            discard_all(&others).await;
                            return Ok(());
                        }
                        Err(e) => {
                            recover::discard(c).await;
                            ran = Some(e.to_string());
                        }
                    }
                }
                match ran {
                    Some(e) => format!(
                        "a resume was interrupted by a daemon restart after the guest ran, and its VM is gone ({e}); its saved state no longer matches its disk"
                    ),
                    // Back: the guest never ran, the snapshot still matches its disk.
                    None => match recover::unretire(&suspended) {
                        Ok(_) => return self.keep_suspended(&mut m).await,
                        Err(e) => format!("a resume was interrupted by a daemon restart and the suspended state is unusable: {e}"),
                    },
                }
            }
            MicrovmState::Suspended => {
                discard_all(&candidates).await;
                match hearth_vmm::Snapshot::open(&suspended) {
                    Ok(_) => return self.keep_suspended(&mut m).await,
                    Err(e) => format!("its suspended state is unusable: {e}"),
                }
            }
            other => format!("it was {other} when the previous Hearth daemon stopped"),
        };
        // Whatever is left of its VM goes (without waiting on an agent), then its files.
        discard_all(&candidates).await;
        let _ = std::fs::remove_dir_all(self.microvm_dir(&id));
        // A terminate cut short is finished as asked, with the reason it had.
        let reason = if m.state == MicrovmState::Terminating { Reason::Keep } else { Reason::Set(Some(lost)) };
        self.transition(&mut m, MicrovmState::Terminated, reason).await
    }

    /// SUSPENDED, with no VM recorded.
    async fn keep_suspended(&self, m: &mut MicrovmRecord) -> Result<(), ApiError> {
        if m.vm_dir.take().is_some() {
            self.put(m).await?;
        }
        Ok(())
    }
}

async fn discard_all(dirs: &[PathBuf]) {
    for d in dirs {
        recover::discard(d).await;
    }
}
