//! Microvms: run, get, list, suspend, resume, terminate, and the slot that holds a running
//! microvm's VM.

use super::faults::ResumeFailure;
use super::{decode_token, encode_token, image_arn, page_size, Reason, Service, MAX_DURATION};
use crate::clock::now;
use crate::error::ApiError;
use crate::inputs::{to_map, GetMicrovmRequest, ListMicrovmsRequest, RunMicrovmRequest};
use crate::keys::random_hex;
use crate::lifecycle::{InvalidTransition, Lifecycle, MicrovmState};
use crate::store::MicrovmRecord;
use hearth_vmm::{crash, RestoreOptions, Snapshot, Vm};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// What a running microvm has in memory.
#[derive(Default)]
pub struct Slot {
    /// The VM while RUNNING. Execs hold clones of the `Arc` while they run (without the
    /// slot's lock); suspend, terminate and release take it back from them.
    pub vm: Option<Arc<Vm>>,
    /// QEMU CPU ticks and when they were read (guest activity).
    pub cpu: Option<(u64, f64)>,
    /// The VM's metadata relay ([`crate::imds`]) while it runs.
    pub imds: Option<crate::imds::Relay>,
}

/// The egress a microvm gets when neither its run nor its image names a connector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DefaultEgress {
    /// INTERNET_EGRESS, as on the service ("by default, MicroVMs have public internet
    /// access": the Lambda MicroVMs networking guide).
    #[default]
    Internet,
    /// None: the operator closes egress unless a run or image names a connector.
    None,
}

impl DefaultEgress {
    /// The connectors recorded for such a microvm.
    fn connectors(self) -> Value {
        match self {
            DefaultEgress::Internet => json!(["INTERNET_EGRESS"]),
            DefaultEgress::None => json!([]),
        }
    }
}

impl std::str::FromStr for DefaultEgress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "internet" => Ok(DefaultEgress::Internet),
            "none" => Ok(DefaultEgress::None),
            other => Err(format!("{other:?} is not a default egress: internet or none")),
        }
    }
}

/// How long a suspend waits for execs in flight to end.
pub(super) const EXEC_DRAIN: Duration = Duration::from_secs(30);

/// Takes the VM out of `slot` once nothing else holds it (execs, tunnels): waits up to
/// `wait`; then, with `kill`, kills QEMU (through its pidfd) and closes the agent so they
/// end, and waits a few more seconds. The VM stays in the slot until it is taken, so a
/// cancelled caller loses nothing. `None` when it could not be taken (the slot still
/// holds it, or it is empty).
pub(super) async fn sole(slot: &mut Slot, wait: Duration, kill: bool) -> Option<Vm> {
    let mut deadline = std::time::Instant::now() + wait;
    let mut killed = false;
    loop {
        let shared = slot.vm.as_ref()?;
        if Arc::strong_count(shared) == 1 {
            let vm = slot.vm.take()?;
            return Arc::try_unwrap(vm).ok();
        }
        if std::time::Instant::now() >= deadline {
            if !kill || killed {
                return None;
            }
            shared.kill_now();
            shared.agent().close();
            killed = true;
            deadline = std::time::Instant::now() + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Service {
    pub(super) fn microvm_json(&self, m: &MicrovmRecord) -> Value {
        let mut v = json!({
            "microvmId": m.microvm_id,
            "state": m.state,
            // The service's form: the host (and port) alone, no scheme (crate::endpoint).
            "endpoint": self.endpoints.host_of(&m.microvm_id),
            "imageArn": image_arn(&m.account, &m.image_name),
            "imageVersion": m.image_version.to_string(),
            "maximumDurationInSeconds": m.maximum_duration_in_seconds,
            "startedAt": m.started_at,
        });
        for k in ["executionRoleArn", "idlePolicy", "kmsKeyIdentifier", "ingressNetworkConnectors", "egressNetworkConnectors"] {
            // (Hearth's own `hearthEgress` stays out of the model's shape.)
            if let Some(x) = m.spec.get(k) {
                v[k] = x.clone();
            }
        }
        if let Some(t) = m.terminated_at {
            v["terminatedAt"] = t.into();
        }
        if let Some(r) = &m.state_reason {
            v["stateReason"] = r.clone().into();
        }
        v
    }

    /// Calls lifecycle hook `which` (run, resume, suspend, terminate) of the app when the
    /// image enables it, with its timeout (default 30 s).
    pub(super) async fn call_hook(&self, vm: &Vm, m: &MicrovmRecord, which: &str, payload: &str) -> Result<(), String> {
        let Some(v) =
            self.store.versions(&m.account, &m.image_name).await.ok().and_then(|vs| vs.into_iter().find(|v| v.version == m.image_version))
        else {
            return Ok(());
        };
        let Some(hooks) = v.spec.get("hooks") else { return Ok(()) };
        let h = &hooks["microvmHooks"];
        if h.get(which).and_then(Value::as_str) != Some("ENABLED") {
            return Ok(());
        }
        let port = hooks.get("port").and_then(Value::as_u64).unwrap_or(8080) as u16;
        let timeout = Duration::from_secs(h.get(format!("{which}TimeoutInSeconds")).and_then(Value::as_u64).unwrap_or(30));
        // Bounded here too: a guest that stops answering must not hold the slot.
        let path = format!("/{which}");
        let call = vm.agent().hook_post(port, &path, bytes::Bytes::from(payload.to_owned()), timeout);
        match tokio::time::timeout(timeout + Duration::from_secs(5), call).await {
            Ok(Ok(r)) if (200..300).contains(&r.status) => Ok(()),
            Ok(Ok(r)) => Err(format!("the /{which} hook answered {}", r.status)),
            Ok(Err(e)) => Err(format!("the /{which} hook failed: {e}")),
            Err(_) => Err(format!("the /{which} hook did not answer within {timeout:?}")),
        }
    }

    pub(super) async fn put(&self, m: &MicrovmRecord) -> Result<(), ApiError> {
        Ok(self.store.put_microvm(m).await?)
    }

    /// RunMicrovm.
    pub async fn run_microvm(&self, account: &str, input: &RunMicrovmRequest) -> Result<Value, ApiError> {
        // One of the account's roles (ValidationException otherwise), before anything else.
        if let Some(role) = input.execution_role_arn.as_deref() {
            self.check_role(account, role).await?;
        }
        let image = self.image(account, &input.image_identifier).await?;
        let versions = self.store.versions(account, &image.name).await?;
        let version = match input.image_version.as_deref() {
            Some(v) => versions.iter().find(|r| r.version.to_string() == v).ok_or_else(|| ApiError::not_found("MicrovmImageVersion", v))?,
            None => versions.iter().rev().find(|r| r.runnable()).ok_or_else(|| {
                ApiError::conflict(
                    "MicrovmImage",
                    &image.name,
                    format!("image {} has no successfully built active version yet", image.name),
                )
            })?,
        };
        if !version.runnable() {
            return Err(ApiError::conflict(
                "MicrovmImageVersion",
                &version.version.to_string(),
                format!(
                    "version {} of {} is {} / {}; only SUCCESSFUL ACTIVE versions run",
                    version.version, image.name, version.state, version.status
                ),
            ));
        }
        // The settings it runs with, kept as given.
        let given = to_map(input);
        self.check_connectors(account, given.get("egressNetworkConnectors")).await?;
        let mut spec = Map::new();
        for k in ["executionRoleArn", "idlePolicy", "kmsKeyIdentifier", "ingressNetworkConnectors", "egressNetworkConnectors", "logging"] {
            if let Some(v) = given.get(k) {
                spec.insert(k.into(), v.clone());
            }
        }
        // Encryption at rest: the run's key, else the image's (crate::service::suspend_crypt).
        if let Some(arn) = self.microvm_key(account, given.get("kmsKeyIdentifier"), version.spec.get("kmsKeyIdentifier")).await? {
            spec.insert(super::suspend_crypt::KEY_FIELD.into(), arn.into());
        }
        // Egress: the run's connectors (an empty list: none), else the image's, else the
        // daemon's default; recorded, so a resume or a pooled claim applies the same.
        if !spec.contains_key("egressNetworkConnectors") {
            let connectors = version.spec.get("egressNetworkConnectors").cloned().unwrap_or_else(|| self.default_egress.connectors());
            spec.insert("egressNetworkConnectors".into(), connectors);
        }
        // A keyed image's template is decrypted into memory on its first use (template_crypt),
        // once the run's own settings are found valid.
        let snap = self.template(account, &image.name, version.version).await?;
        let t = now();
        // A pooled VM of this version when one is ready: it already runs under its id.
        let key: super::pools::Key = (account.to_owned(), image.name.clone(), version.version);
        let pooled = self.pools.take(&key);
        let id = pooled.as_ref().map_or_else(|| format!("mvm-{}", random_hex(8)), |w| w.id.clone());
        let mut m = MicrovmRecord {
            microvm_id: id.clone(),
            account: account.into(),
            image_name: image.name.clone(),
            image_version: version.version,
            state: MicrovmState::Pending,
            state_reason: None,
            spec: Value::Object(spec),
            started_at: t,
            terminated_at: None,
            last_activity: t,
            suspended_at: None,
            maximum_duration_in_seconds: input.maximum_duration_in_seconds.and_then(|n| u64::try_from(n).ok()).unwrap_or(MAX_DURATION),
            memory_mib: snap.manifest.memory_mib,
            vcpus: snap.manifest.vcpus,
            vm_dir: None,
        };
        // Quotas and the host's room: checked, and the record written, under one lock.
        let admitted = match self.admit_microvm(account, m.memory_mib, m.vcpus, pooled.is_some()).await {
            Ok(g) => g,
            Err(e) => {
                if let Some(w) = pooled {
                    self.pools.put_back(&key, w);
                }
                return Err(e);
            }
        };
        let slot = self.slot(&id);
        let mut guard = slot.lock().await;
        self.put(&m).await?;
        drop(admitted);
        crash::point("run.recorded");
        let started = std::time::Instant::now();
        let has_nic = snap.manifest.network.is_some();
        let launched = match pooled {
            Some(w) => match self.claim_pooled(w, &m, has_nic).await {
                Ok(vm) => Ok(vm),
                Err(e) => {
                    // A pooled VM that will not wake is replaced by a fresh launch.
                    tracing::warn!(microvm = %id, error = %e, "a pooled VM could not be claimed; launching");
                    self.metrics.error("pool-claim");
                    Vm::launch(&snap, &self.restore_options(&m, has_nic)).await
                }
            },
            None => Vm::launch(&snap, &self.restore_options(&m, has_nic)).await,
        };
        // The next run of this version finds a VM ready.
        self.ensure_pool(&key, &snap).await;
        match launched {
            Ok(vm) => {
                m.vm_dir = Some(vm.run_dir().display().to_string());
                // Recorded before the hook: a crash from here on still finds the VM.
                self.put(&m).await?;
                crash::point("run.vm-recorded");
                // The run hook already finds the metadata service (its role's credentials).
                self.imds_start(&mut guard, &vm, &m);
                let payload = input.run_hook_payload.as_deref().unwrap_or_default();
                if let Err(e) = self.call_hook(&vm, &m, "run", payload).await {
                    // The app refused to start this microvm: it is not handed out.
                    self.imds_end(&mut guard, &id).await;
                    vm.kill().await;
                    self.transition(&mut m, MicrovmState::Terminated, Reason::Set(Some(e))).await?;
                    self.metrics.error("run-hook");
                    return Ok(self.microvm_json(&m));
                }
                self.hold(&mut guard, vm, &m);
                self.transition(&mut m, MicrovmState::Running, Reason::Keep).await?;
                self.metrics.observe("launch", started.elapsed());
            }
            Err(e) => {
                self.transition(&mut m, MicrovmState::Terminated, Reason::Set(Some(format!("launch failed: {e}")))).await?;
                self.metrics.error("launch");
            }
        }
        Ok(self.microvm_json(&m))
    }

    pub(super) fn restore_options(&self, m: &MicrovmRecord, has_nic: bool) -> RestoreOptions {
        if let Some(e) = m.spec.get("hearthEgress").and_then(|e| serde_json::from_value::<hearth_vmm::net::Egress>(e.clone()).ok()) {
            return RestoreOptions {
                run_root: self.vm_template.run_root.clone(),
                timeout: Duration::from_secs(120),
                hostname: None,
                egress: has_nic.then_some(e),
                detached: true,
                name: Some(m.microvm_id.clone()),
                jail: self.vm_template.jail.clone(),
                limits: self.vm_template.limits,
            };
        }
        let connectors: Vec<&str> =
            m.spec.get("egressNetworkConnectors").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        // INTERNET_EGRESS and named connectors, as they are now.
        let egress = has_nic.then(|| self.connectors_egress(&m.account, &connectors));
        // Detached: microvms outlive the daemon (a crash or an upgrade) and are reattached.
        RestoreOptions {
            run_root: self.vm_template.run_root.clone(),
            timeout: Duration::from_secs(120),
            hostname: None,
            egress,
            detached: true,
            name: Some(m.microvm_id.clone()),
            jail: self.vm_template.jail.clone(),
            limits: self.vm_template.limits,
        }
    }

    /// GetMicrovm.
    pub async fn get_microvm(&self, account: &str, input: &GetMicrovmRequest) -> Result<Value, ApiError> {
        let m = self.load(account, &input.microvm_identifier).await?;
        Ok(self.microvm_json(&m))
    }

    /// ListMicrovms.
    pub async fn list_microvms(&self, account: &str, input: &ListMicrovmsRequest) -> Result<Value, ApiError> {
        let limit = page_size(input.max_results);
        let mut after = decode_token(input.next_token.as_deref())?;
        let image = input.image_identifier.as_deref().map(|i| Self::image_name(account, i)).transpose()?;
        let version = input.image_version.as_deref();
        let mut items = Vec::new();
        let mut next = None;
        // Filters apply while paging, so a page is full unless the list ended.
        'outer: loop {
            let batch = self.store.list_microvms(account, after, limit.max(1) * 2).await?;
            if batch.is_empty() {
                break;
            }
            for (seq, m) in batch {
                after = seq;
                if image.as_ref().is_some_and(|i| *i != m.image_name) || version.is_some_and(|v| v != m.image_version.to_string()) {
                    continue;
                }
                if items.len() == limit {
                    next = Some(seq - 1);
                    break 'outer;
                }
                items.push(json!({
                    "microvmId": m.microvm_id,
                    "state": m.state,
                    "imageArn": image_arn(&m.account, &m.image_name),
                    "imageVersion": m.image_version.to_string(),
                    "startedAt": m.started_at,
                }));
            }
        }
        let mut out = json!({ "items": items });
        if let Some(n) = next {
            out["nextToken"] = encode_token(n).into();
        }
        Ok(out)
    }

    /// SuspendMicrovm (also used by the idle policy).
    pub async fn suspend_microvm(&self, account: &str, ident: &str, reason: Option<&str>) -> Result<Value, ApiError> {
        let (id, mut guard, mut m) = self.locked(account, ident).await?;
        m.state.check(&id, MicrovmState::Suspending)?;
        if reason.is_none() {
            // The tenant's own suspend counts against its snapshot disk; the idle policy's
            // and the host's do not (they must be able to free the VM).
            self.admit_suspend(&m).await?;
        }
        if guard.vm.is_none() {
            return Err(ApiError::internal(format!("microvm {id} is RUNNING without a VM")));
        }
        // Execs and connections in flight finish first (new ones wait for the slot).
        let Some(vm) = sole(&mut guard, EXEC_DRAIN, false).await else {
            return Err(ApiError::conflict(
                "Microvm",
                &id,
                format!("microvm {id} still has execs or connections after {EXEC_DRAIN:?}; suspend it when they end"),
            ));
        };
        self.transition(&mut m, MicrovmState::Suspending, Reason::Keep).await?;
        crash::point("suspend.recorded");
        // The app hears of it first; a failing hook does not stop the suspend.
        let hook_error = self.call_hook(&vm, &m, "suspend", "").await.err();
        // No metadata stream may be open on the agent channel when it is detached; the
        // guest's tokens and credentials go with the relay (fresh ones after the resume).
        self.imds_stop(&mut guard).await;
        let dir = self.microvm_dir(&id).join("suspended");
        let _ = std::fs::create_dir_all(self.microvm_dir(&id));
        let started = std::time::Instant::now();
        match vm.suspend(&dir).await {
            Ok(_) => {
                tracing::debug!(microvm = %id, elapsed = ?started.elapsed(), "suspend: the VM is saved and gone");
                crash::point("suspend.done");
                let unsealed = self.seal_suspended(&m, &dir).await.err();
                let why = unsealed.or(reason.map(str::to_owned)).or(hook_error);
                self.transition(&mut m, MicrovmState::Suspended, Reason::Set(why)).await?;
                self.metrics.observe("suspend", started.elapsed());
                Ok(json!({}))
            }
            Err((vm, e)) => {
                self.metrics.error("suspend");
                Err(self.suspend_failed(&mut guard, &mut m, *vm, e).await)
            }
        }
    }

    /// ResumeMicrovm (also used by auto-resume).
    pub async fn resume_microvm(&self, account: &str, ident: &str) -> Result<Value, ApiError> {
        let (_, mut guard, m) = self.locked(account, ident).await?;
        self.resume_locked(&mut guard, m).await.map(|_| json!({}))
    }

    pub(super) async fn resume_locked(&self, guard: &mut Slot, mut m: MicrovmRecord) -> Result<MicrovmRecord, ApiError> {
        let id = m.microvm_id.clone();
        if m.state != MicrovmState::Suspended {
            // PENDING and SUSPENDING lead to RUNNING too, but not through a resume.
            return Err(InvalidTransition { id, from: m.state, to: MicrovmState::Running }.into());
        }
        // Quotas and the host's room, held until the resume ends.
        let _admitted = self.admit_resume(&m).await?;
        let dir = self.microvm_dir(&id).join("suspended");
        self.unseal_suspended(&m, &dir).await?;
        let snap = match Snapshot::open(&dir) {
            Ok(s) => s,
            Err(e) => {
                let err = self.resume_failed(&mut m, ResumeFailure::Open(e)).await;
                self.reseal_if_suspended(&m, &dir).await;
                return Err(err);
            }
        };
        let started = std::time::Instant::now();
        match Vm::resume(&snap, &self.restore_options(&m, snap.manifest.network.is_some())).await {
            Ok(vm) => {
                // Each step recorded before the next (reconcile reads them after a crash):
                // the retired manifest, the new QEMU's vm.json (named after the microvm),
                // its run directory here, RUNNING; only then is the saved state deleted.
                crash::point("resume.vm-started");
                m.vm_dir = Some(vm.run_dir().display().to_string());
                self.put(&m).await?;
                crash::point("resume.vm-recorded");
                self.imds_start(guard, &vm, &m);
                let hook_error = self.call_hook(&vm, &m, "resume", "").await.err();
                self.hold(guard, vm, &m);
                guard.cpu = None;
                self.transition(&mut m, MicrovmState::Running, Reason::Set(hook_error)).await?;
                crash::point("resume.running");
                hearth_vmm::restore::finish_resume(&dir);
                self.metrics.observe("resume", started.elapsed());
                Ok(m)
            }
            Err(e) => {
                self.metrics.error("resume");
                let err = self.resume_failed(&mut m, ResumeFailure::Start(e)).await;
                self.reseal_if_suspended(&m, &dir).await;
                Err(err)
            }
        }
    }

    /// TerminateMicrovm (also used by the lifetime and idle policies).
    pub async fn terminate_microvm(&self, account: &str, ident: &str, reason: Option<&str>) -> Result<Value, ApiError> {
        let (id, mut guard, mut m) = self.locked(account, ident).await?;
        // A terminate cut off half-way is finished by the next.
        if m.state != MicrovmState::Terminating {
            self.transition(&mut m, MicrovmState::Terminating, Reason::Keep).await?;
        }
        crash::point("terminate.recorded");
        if let Some(shared) = guard.vm.clone() {
            if let Err(e) = self.call_hook(&shared, &m, "terminate", "").await {
                tracing::info!(microvm = %id, error = %e, "terminate hook");
            }
            drop(shared);
            // Execs in flight get a moment, then QEMU is killed under them.
            match sole(&mut guard, Duration::from_secs(2), true).await {
                Some(vm) => {
                    vm.kill().await;
                }
                // Still held somewhere (a stuck stream): QEMU is dead; its last holder
                // drops the rest.
                None => drop(guard.vm.take()),
            }
        }
        crash::point("terminate.killed");
        self.imds_end(&mut guard, &id).await;
        let _ = std::fs::remove_dir_all(self.microvm_dir(&id));
        self.transition(&mut m, MicrovmState::Terminated, reason.map_or(Reason::Keep, |r| Reason::Set(Some(r.to_owned())))).await?;
        drop(guard);
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(json!({}))
    }

    /// Lets every running VM go on without this daemon (its graceful stop); the next
    /// start reattaches them.
    pub async fn release_all(&self) {
        // Pooled VMs belong to no microvm: they go with the daemon.
        self.pools.clear();
        let slots: Vec<_> = self.slots.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for s in slots {
            let mut guard = s.lock().await;
            // The relay goes with the daemon; the next start's reattach starts a new one.
            drop(guard.imds.take());
            if guard.vm.is_none() {
                continue;
            }
            // Execs end (their connection is closed) rather than the VM.
            if sole(&mut guard, Duration::from_secs(5), false).await.map(Vm::release).is_none() {
                if let Some(v) = &guard.vm {
                    v.agent().close();
                }
                if let Some(vm) = sole(&mut guard, Duration::from_secs(10), false).await {
                    vm.release();
                } else {
                    tracing::warn!("a VM was still in use at shutdown and is left to the next start's reconcile");
                    // Leaked on purpose: dropping it would kill a VM meant to outlive us.
                    std::mem::forget(guard.vm.take());
                }
            }
        }
        // Keyed templates' plain RAM leaves memory with the daemon (running VMs keep
        // their mappings); the next start decrypts again on first use.
        self.drop_all_template_views();
    }
}
