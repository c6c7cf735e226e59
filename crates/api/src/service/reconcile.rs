//! On start: what the previous daemon left (builds cut off, VMs to reattach, microvms lost)
//! is brought to a state the lifecycle allows.

use super::{Reason, Service};
use crate::error::ApiError;
use crate::lifecycle::{MicrovmImageState, MicrovmImageVersionState as VersionState, MicrovmState};
use hearth_vmm::Vm;
use std::sync::Arc;

impl Service {
    /// After a restart: RUNNING microvms are reattached (their QEMU outlived the previous
    /// daemon); SUSPENDED ones stay when their state is on disk. Any other — a QEMU that
    /// died, a state lost half-way (a transitional state) — is TERMINATED with the reason.
    /// Builds cut off are FAILED; detached VMs no record owns are killed.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        // Builds cut off by the stop: FAILED, their partial files gone.
        for mut v in self.store.unfinished_versions().await? {
            let _ = std::fs::remove_dir_all(self.version_dir(&v.account, &v.name, v.version));
            let why = "the build was interrupted by a daemon restart; UpdateMicrovmImage builds again";
            self.version_transition(&mut v, VersionState::Failed, Reason::Set(Some(why.into()))).await?;
            if let Some(mut i) = self.store.image(&v.account, &v.name).await? {
                match i.state {
                    MicrovmImageState::Creating => self.image_transition(&mut i, MicrovmImageState::CreateFailed).await?,
                    MicrovmImageState::Updating => self.image_transition(&mut i, MicrovmImageState::UpdateFailed).await?,
                    _ => {}
                }
            }
        }
        for mut m in self.store.live_microvms().await? {
            let ok = match m.state {
                MicrovmState::Suspended => self.microvm_dir(&m.microvm_id).join("suspended").join("manifest.json").is_file(),
                MicrovmState::Running => match &m.vm_dir {
                    Some(d) => match Vm::reattach(std::path::Path::new(d)).await {
                        Ok(vm) => {
                            self.slot(&m.microvm_id).lock().await.vm = Some(Arc::new(vm));
                            true
                        }
                        Err(e) => {
                            m.state_reason = Some(format!("lost while the daemon was down: {e}"));
                            false
                        }
                    },
                    None => false,
                },
                _ => false,
            };
            if !ok {
                let why = m.state_reason.take().unwrap_or_else(|| format!("it was {} when the previous Hearth daemon stopped", m.state));
                if let Some(d) = &m.vm_dir {
                    // Whatever is left of its VM goes (a QEMU that lost its agent, files).
                    if let Ok(vm) = Vm::reattach(std::path::Path::new(d)).await {
                        vm.kill().await;
                    }
                }
                self.transition(&mut m, MicrovmState::Terminated, Reason::Set(Some(why))).await?;
                let _ = std::fs::remove_dir_all(self.microvm_dir(&m.microvm_id));
            }
        }
        // Detached VMs nobody reattached (a crash between their start and their record) are
        // killed; then run directories whose QEMU is gone go.
        hearth_vmm::vm::kill_unowned_detached(&self.vm_template.run_root);
        hearth_vmm::vm::sweep_stale_run_dirs(&self.vm_template.run_root);
        Ok(())
    }
}
