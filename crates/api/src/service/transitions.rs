//! The one way microvms, image versions and images change state: the move is checked
//! against the lifecycle's table ([`crate::lifecycle`]), then the record (and, for
//! microvms, the usage meter) is written in one place.

use super::{suspended_size, Reason, Service};
use crate::clock::now;
use crate::error::ApiError;
use crate::lifecycle::{Lifecycle, MicrovmImageState, MicrovmImageVersionState as VersionState, MicrovmState};
use crate::store::Meter;
use crate::store::{ImageRecord, MicrovmRecord, VersionRecord};

impl Service {
    /// Moves microvm `m` to `to`: the one way a microvm changes state. Checks the move
    /// against [`MicrovmState`]'s table, sets the times the new state carries
    /// (`terminatedAt`, `suspendedAt`, activity on resume) and the reason, and writes the
    /// record and the usage meter's change in one store transaction. The meter: a RUNNING
    /// period opens when the VM starts or resumes; it closes, and a SUSPENDED one (with the
    /// size of the saved state) opens, when it is suspended; whatever is open closes when it
    /// ends.
    pub(super) async fn transition(&self, m: &mut MicrovmRecord, to: MicrovmState, reason: Reason) -> Result<(), ApiError> {
        use MicrovmState::*;
        m.state.check(&m.microvm_id, to)?;
        let t = now();
        let mut meter = Meter::default();
        match (m.state, to) {
            (Suspended, Running) => {
                m.suspended_at = None;
                m.last_activity = t;
                meter = Meter { close: true, open: Some((Running, 0)) };
            }
            // A failed suspend: the VM ran on, its RUNNING period too.
            (Suspending, Running) => {}
            (_, Running) => meter.open = Some((Running, 0)),
            (_, Suspended) => {
                m.suspended_at = Some(t);
                let bytes = suspended_size(&self.microvm_dir(&m.microvm_id).join("suspended"));
                meter = Meter { close: true, open: Some((Suspended, bytes)) };
            }
            (_, Terminated) => {
                m.terminated_at = Some(t);
                meter.close = true;
            }
            (_, Pending | Suspending | Terminating) => {}
        }
        if let Reason::Set(r) = reason {
            m.state_reason = r;
        }
        m.state = to;
        self.store.put_microvm_metered(m, meter, t).await?;
        if to == Terminated {
            // Every way a microvm ends (terminate, a QEMU exit, a failed resume or suspend,
            // the start-up reconcile) ends the role credentials issued to it, which its
            // guest may have fetched and copied out.
            if let Err(e) = self.revoke_sessions(&m.microvm_id).await {
                tracing::error!(microvm = %m.microvm_id, error = %e, "could not revoke the role sessions of a terminated microvm");
            }
        }
        Ok(())
    }

    /// Moves version `v` to `to` (checked against [`VersionState`]'s table) and writes it;
    /// a build that ends (SUCCESSFUL, FAILED) records when.
    pub(super) async fn version_transition(&self, v: &mut VersionRecord, to: VersionState, reason: Reason) -> Result<(), ApiError> {
        v.state.check(&v.version.to_string(), to)?;
        if matches!(to, VersionState::Successful | VersionState::Failed) {
            v.updated_at = Some(now());
        }
        if let Reason::Set(r) = reason {
            v.state_reason = r;
        }
        v.state = to;
        Ok(self.store.put_version(v).await?)
    }

    /// Moves image `i` to `to` (checked against [`MicrovmImageState`]'s table) and writes it.
    pub(super) async fn image_transition(&self, i: &mut ImageRecord, to: MicrovmImageState) -> Result<(), ApiError> {
        i.state.check(&i.name, to)?;
        i.state = to;
        Ok(self.store.put_image(i).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn service(dir: &std::path::Path) -> Service {
        let store = crate::store::Store::open(&dir.join("hearth.db")).unwrap();
        let token_key = crate::ingress::TokenKey::load_or_create(dir).unwrap();
        let vm = hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs");
        Service::new(store, dir.into(), dir.into(), vm, token_key)
    }

    fn pending(id: &str) -> MicrovmRecord {
        MicrovmRecord {
            microvm_id: id.into(),
            account: "111111111111".into(),
            image_name: "img".into(),
            image_version: 1,
            state: MicrovmState::Pending,
            state_reason: None,
            spec: serde_json::json!({}),
            started_at: 0.0,
            terminated_at: None,
            last_activity: 0.0,
            suspended_at: None,
            maximum_duration_in_seconds: 60,
            memory_mib: 1024,
            vcpus: 2,
            vm_dir: None,
        }
    }

    /// True when a RUNNING period is open (counted up to a time far ahead, it is huge).
    async fn running_open(svc: &Service) -> bool {
        svc.store.usage("111111111111", 0.0, 1e12, 1e12).await.unwrap().vcpu_seconds > 1e9
    }

    #[tokio::test]
    async fn each_move_writes_the_record_its_times_and_the_meter_together() {
        use MicrovmState::*;
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path());
        let mut m = pending("mvm-1");
        svc.store.put_microvm(&m).await.unwrap();

        svc.transition(&mut m, Running, Reason::Keep).await.unwrap();
        assert_eq!(svc.store.microvm("111111111111", "mvm-1").await.unwrap().unwrap().state, Running);
        assert!(running_open(&svc).await, "a RUNNING period opens");

        svc.transition(&mut m, Suspending, Reason::Keep).await.unwrap();
        svc.transition(&mut m, Suspended, Reason::Set(Some("idle".into()))).await.unwrap();
        let r = svc.store.microvm("111111111111", "mvm-1").await.unwrap().unwrap();
        assert_eq!((r.state, r.state_reason.as_deref()), (Suspended, Some("idle")));
        assert!(r.suspended_at.is_some());
        assert!(!running_open(&svc).await, "the RUNNING period closed");

        svc.transition(&mut m, Running, Reason::Set(None)).await.unwrap();
        let r = svc.store.microvm("111111111111", "mvm-1").await.unwrap().unwrap();
        assert_eq!((r.state, r.state_reason, r.suspended_at), (Running, None, None));
        assert!(r.last_activity > 0.0, "a resume is activity");
        assert!(running_open(&svc).await);

        svc.transition(&mut m, Terminating, Reason::Keep).await.unwrap();
        svc.transition(&mut m, Terminated, Reason::Set(Some("done".into()))).await.unwrap();
        let r = svc.store.microvm("111111111111", "mvm-1").await.unwrap().unwrap();
        assert_eq!(r.state, Terminated);
        assert!(r.terminated_at.is_some());
        assert!(!running_open(&svc).await, "everything open closed");

        // An illegal move: a 409 from the table, and nothing written.
        let e = svc.transition(&mut m, Running, Reason::Set(Some("no".into()))).await.unwrap_err();
        assert_eq!((e.kind, e.status()), (Kind::Conflict, 409));
        assert_eq!(e.resource, Some(("Microvm".into(), "mvm-1".into())));
        let after = svc.store.microvm("111111111111", "mvm-1").await.unwrap().unwrap();
        assert_eq!((after.state, after.state_reason.as_deref()), (Terminated, Some("done")));
        assert_eq!((m.state, m.state_reason.as_deref()), (Terminated, Some("done")));
    }
}
