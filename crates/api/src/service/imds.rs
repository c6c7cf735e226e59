//! The metadata relay of running microvms ([`crate::imds`]): started when a VM enters its
//! microvm's slot (or just before its run or resume hook, so hooks already have it),
//! stopped before a suspend's snapshot and at terminate, which also revokes the microvm's
//! credentials.

use super::microvms::Slot;
use super::Service;
use crate::error::ApiError;
use crate::store::MicrovmRecord;
use hearth_vmm::Vm;

impl Service {
    /// Makes sure microvm `m`'s slot relays metadata for `vm` (a relay of an earlier VM
    /// of the slot is replaced). Services not made with [`Service::shared`] (unit tests)
    /// relay nothing.
    pub(super) fn imds_start(&self, guard: &mut Slot, vm: &Vm, m: &MicrovmRecord) {
        if guard.imds.as_ref().is_some_and(|r| r.vm_id() == vm.id()) {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        guard.imds = Some(crate::imds::Relay::start(me, vm.agent().clone(), &m.account, &m.microvm_id, vm.id()));
    }

    /// Stops the slot's relay and waits until its accepts are withdrawn from the agent.
    pub(super) async fn imds_stop(&self, guard: &mut Slot) {
        if let Some(r) = guard.imds.take() {
            r.stop().await;
        }
    }

    /// Microvm `id`'s record, for the relay (identity from the channel: the relay knows
    /// whose VM it serves).
    pub(crate) async fn imds_record(&self, account: &str, id: &str) -> Result<Option<MicrovmRecord>, ApiError> {
        Ok(self.store.microvm(account, id).await?)
    }

    /// At terminate: the relay goes and every credential issued to the microvm is revoked.
    pub(super) async fn imds_end(&self, guard: &mut Slot, id: &str) {
        self.imds_stop(guard).await;
        if let Err(e) = self.revoke_sessions(id).await {
            tracing::error!(microvm = %id, error = %e, "revoking the microvm's credentials");
        }
    }
}
