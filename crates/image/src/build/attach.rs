//! What the daemon attaches to each builder VM while it runs: the metadata relay that
//! gives the image's RUN steps and hooks the build role's credentials (`hearth-api`'s
//! `imds`). Kept as trait objects so that this crate knows nothing of the daemon.
//!
//! [`BuilderHook::attach`] is called once a builder VM has booted (the last stage's and
//! every earlier stage's), before any step runs in it. What it returns lives while the
//! builder runs: [`Attached::stop`] is awaited before the builder is snapshotted (so
//! nothing of it is in flight on the agent channel when the template is saved, and what it
//! handed out can be revoked first) or, for an earlier stage, before its VM goes; on every
//! failure path (a step failing, a timeout, a cancel) it is dropped with the builder.

use futures_util::future::BoxFuture;
use hearth_vmm::agent::AgentClient;

/// Something attached to a running builder VM; dropping it ends it without waiting.
pub trait Attached: Send {
    /// Ends it and waits until it has ended.
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Called for each builder VM a build boots.
pub trait BuilderHook: Send + Sync {
    /// Attaches to the builder VM `vm_id`, whose agent answers on `agent`.
    fn attach(&self, agent: &AgentClient, vm_id: &str) -> Box<dyn Attached>;
}

/// What a build attached to one of its builders, stopped before it is snapshotted or
/// dropped with it.
#[derive(Default)]
pub(super) struct Attachment(Option<Box<dyn Attached>>);

impl Attachment {
    /// Attaches `hook` (if any) to `vm`.
    pub(super) fn to(hook: Option<&std::sync::Arc<dyn BuilderHook>>, vm: &hearth_vmm::Vm) -> Attachment {
        Attachment(hook.map(|h| h.attach(vm.agent(), vm.id())))
    }

    /// Stops what was attached and waits for it.
    pub(super) async fn stop(mut self) {
        if let Some(a) = self.0.take() {
            a.stop().await;
        }
    }
}
