//! The metadata relay of running microvms ([`crate::imds`]): started when a VM enters its
//! microvm's slot (or just before its run or resume hook, so hooks already have it),
//! stopped before a suspend's snapshot and at terminate, which also revokes the microvm's
//! credentials.
//!
//! And of image builds ([`BuildRelays`]): each builder VM gets a relay serving the
//! version's `buildRoleArn` once it has booted; it is stopped and the build's sessions
//! revoked before the template snapshot (and again at the end of the build, whatever its
//! outcome: [`Service::end_build_sessions`]).

use super::microvms::Slot;
use super::Service;
use crate::error::ApiError;
use crate::store::MicrovmRecord;
use crate::store::VersionRecord;
use hearth_image::build::{Attached, BuilderHook};
use hearth_vmm::agent::AgentClient;
use hearth_vmm::Vm;
use std::sync::Arc;

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

/// The relays of one image build's builder VMs ([`hearth_image::build::Control`]'s hook).
pub(super) struct BuildRelays {
    svc: Arc<Service>,
    account: String,
    build: crate::imds::Build,
}

/// One builder VM's relay.
struct BuildRelay {
    relay: crate::imds::Relay,
    svc: Arc<Service>,
    subject: String,
}

impl BuilderHook for BuildRelays {
    fn attach(&self, agent: &AgentClient, vm_id: &str) -> Box<dyn Attached> {
        let relay = crate::imds::Relay::start_build(self.svc.clone(), agent.clone(), &self.account, self.build.clone(), vm_id);
        Box::new(BuildRelay { relay, svc: self.svc.clone(), subject: self.build.subject.clone() })
    }
}

impl Attached for BuildRelay {
    /// Before the template snapshot (or an earlier stage's VM going): the relay stops and
    /// every credential the build was issued is revoked, so none the guest's RAM still
    /// holds works once it is a template.
    fn stop(self: Box<Self>) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            self.relay.stop().await;
            self.svc.end_build_sessions(&self.subject).await;
        })
    }
}

/// The subject a build's sessions are issued to: its version's build id (`build-<hex>`,
/// never a microvm's id).
pub(super) fn build_subject(rec: &VersionRecord) -> &str {
    &rec.build_id
}

impl Service {
    /// The hook that gives each builder VM of `rec`'s build a relay serving its
    /// `buildRoleArn`.
    pub(super) fn build_relays(self: &Arc<Self>, rec: &VersionRecord) -> Arc<dyn BuilderHook> {
        let build = crate::imds::Build {
            subject: build_subject(rec).to_owned(),
            image_arn: super::image_arn(&rec.account, &rec.name),
            version: rec.version,
            role: rec.spec.get("buildRoleArn").and_then(serde_json::Value::as_str).map(str::to_owned),
            started_at: crate::clock::now(),
        };
        Arc::new(BuildRelays { svc: self.clone(), account: rec.account.clone(), build })
    }

    /// Revokes every credential issued to the build whose subject is `subject`.
    pub(super) async fn end_build_sessions(&self, subject: &str) {
        if let Err(e) = self.revoke_sessions(subject).await {
            tracing::error!(build = %subject, error = %e, "revoking the build's credentials");
        }
    }
}

/// Revokes a build's credentials when dropped before [`RevokeOnDrop::disarm`] (its task
/// ended early: a panic). A daemon that stops mid-build revokes them at its next start
/// (`prepare_recovery`).
pub(super) struct RevokeOnDrop(Option<(Arc<Service>, String)>);

impl RevokeOnDrop {
    pub(super) fn new(svc: &Arc<Service>, subject: &str) -> RevokeOnDrop {
        RevokeOnDrop(Some((svc.clone(), subject.to_owned())))
    }

    /// The build revoked them itself.
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        if let Some((svc, subject)) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { svc.end_build_sessions(&subject).await });
            }
        }
    }
}
