//! The operations: microvm lifecycle, images and their builds, tags — each handler gets an
//! input the model has already validated and the caller's account.
//!
//! Every microvm has a slot with an async lock; an operation on a microvm holds it from
//! reading the record to writing the result, so calls on one microvm serialize and each
//! sees the state the previous one left. The transitional state (SUSPENDING, TERMINATING…)
//! is written before the action, the final one after it.

use hearth_proto::exec::ExecRequest;
mod artifacts;
use crate::error::{ApiError, Kind};
use crate::store::{ImageRecord, MicrovmRecord, Store, VersionRecord};
use hearth_vmm::{RestoreOptions, Snapshot, Vm, VmConfig};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The partition, region and account form of Hearth ARNs
/// (`arn:aws-hearth:lambda:hh-local-1:<12-digit account>:microvm-image:<name>`): shaped to
/// pass the model's ARN patterns, plainly not AWS's.
pub const PARTITION: &str = "aws-hearth";
/// The region in Hearth ARNs.
pub const REGION: &str = "hh-local-1";
/// Default and largest `maximumDurationInSeconds`.
pub const MAX_DURATION: u64 = 28_800;
/// Page size when `maxResults` is absent.
const DEFAULT_PAGE: usize = 50;

/// Seconds since the epoch.
pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn db(e: rusqlite::Error) -> ApiError {
    ApiError::internal(format!("database: {e}"))
}

/// `n` random bytes in hex (panics when the OS gives none: see [`crate::keys`]).
fn random_hex(n: usize) -> String {
    crate::keys::random(n).iter().map(|x| format!("{x:02x}")).collect()
}

/// An image's ARN.
pub fn image_arn(account: &str, name: &str) -> String {
    format!("arn:{PARTITION}:lambda:{REGION}:{account}:microvm-image:{name}")
}

/// A managed base image's ARN.
pub fn managed_arn(name: &str) -> String {
    format!("arn:{PARTITION}:lambda:{REGION}:hearth:microvm-image:{name}")
}

/// An image name as the model's `ImageName` means it, matched whole (the model's
/// unanchored pattern would let `-/../x` through): 1-64 of `[A-Za-z0-9_-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The managed bases: API name and Hearth base.
pub const MANAGED: &[(&str, hearth_image::base::Base)] =
    &[("debian-bookworm", hearth_image::base::Base::DebianBookworm), ("minimal", hearth_image::base::Base::Busybox)];

/// What a running microvm has in memory.
#[derive(Default)]
pub struct Slot {
    /// The VM while RUNNING. Execs hold clones of the `Arc` while they run (without the
    /// slot's lock); suspend, terminate and release take it back from them.
    pub vm: Option<Arc<Vm>>,
    /// QEMU CPU ticks and when they were read (guest activity).
    pub cpu: Option<(u64, f64)>,
}

/// How long a suspend waits for execs in flight to end.
const EXEC_DRAIN: Duration = Duration::from_secs(30);

/// Takes the VM out of `slot` once nothing else holds it (execs, tunnels): waits up to
/// `wait`; then, with `kill`, kills QEMU (through its pidfd) and closes the agent so they
/// end, and waits a few more seconds. The VM stays in the slot until it is taken, so a
/// cancelled caller loses nothing. `None` when it could not be taken (the slot still
/// holds it, or it is empty).
async fn sole(slot: &mut Slot, wait: Duration, kill: bool) -> Option<Vm> {
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

/// The service.
pub struct Service {
    /// The database.
    pub store: Store,
    /// `$HEARTH_HOME`.
    pub home: PathBuf,
    /// The API's state directory.
    pub state: PathBuf,
    /// The daemon's URL as clients reach it (endpoints are under it).
    pub public_url: String,
    /// Kernel, initramfs, accelerator, run directory of every VM.
    pub vm_template: VmConfig,
    slots: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    /// Counters and latency samples for /metrics.
    pub metrics: crate::metrics::Metrics,
    /// Signs and checks ingress tokens.
    pub token_key: crate::ingress::TokenKey,
    ingress: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// Most concurrent ingress connections to one microvm (below the agent's 256 HTTP/2
/// streams, so execs, files and hooks always have streams left).
pub const MAX_INGRESS_CONNECTIONS: usize = 192;

/// The ingress connector that enables shells (CreateMicrovmShellAuthToken).
pub const SHELL_INGRESS: &str = "SHELL_INGRESS";

fn s(v: &Value) -> Option<&str> {
    v.as_str()
}

impl Service {
    /// A service over `store`.
    pub fn new(store: Store, home: PathBuf, state: PathBuf, vm_template: VmConfig, token_key: crate::ingress::TokenKey) -> Self {
        Service {
            store,
            home,
            state,
            public_url: String::new(),
            vm_template,
            slots: Default::default(),
            metrics: Default::default(),
            token_key,
            ingress: Default::default(),
        }
    }

    /// A permit for one ingress connection to microvm `id` (at most
    /// [`MAX_INGRESS_CONNECTIONS`] at once).
    pub fn ingress_permit(&self, id: &str) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::TryAcquireError> {
        let sem = self
            .ingress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_INGRESS_CONNECTIONS)))
            .clone();
        sem.try_acquire_owned()
    }

    /// CreateMicrovmAuthToken: a token for the microvm's endpoint.
    pub fn auth_token(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let ports = crate::ingress::port_ranges(&input["allowedPorts"])?;
        let m = self.load(account, s(&input["microvmIdentifier"]).unwrap_or_default())?;
        self.issue_token(account, &m, input, ports, None)
    }

    /// CreateMicrovmShellAuthToken: a token for the microvm's shell (`/shell/<id>`), only
    /// for microvms run with the `SHELL_INGRESS` connector, as the service requires.
    pub fn shell_token(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let m = self.load(account, s(&input["microvmIdentifier"]).unwrap_or_default())?;
        let connectors = m.spec.get("ingressNetworkConnectors").and_then(Value::as_array);
        if !connectors.into_iter().flatten().filter_map(Value::as_str).any(|c| c.contains(SHELL_INGRESS)) {
            return Err(ApiError::validation(format!(
                "microvm {} was not run with the {SHELL_INGRESS} ingress network connector; run it with ingressNetworkConnectors=[\"{SHELL_INGRESS}\"] for shells",
                m.microvm_id
            )));
        }
        // Port 0 only: should a daemon that predates token scopes ever read this token, it
        // opens no port of the endpoint.
        self.issue_token(account, &m, input, vec![(0, 0)], Some(crate::ingress::SHELL_SCOPE.to_owned()))
    }

    fn issue_token(
        &self,
        account: &str,
        m: &MicrovmRecord,
        input: &Map<String, Value>,
        ports: Vec<(u16, u16)>,
        scope: Option<String>,
    ) -> Result<Value, ApiError> {
        if m.state == "TERMINATED" || m.state == "TERMINATING" {
            return Err(ApiError::conflict("Microvm", &m.microvm_id, format!("microvm {} is {}", m.microvm_id, m.state)));
        }
        let minutes = input.get("expirationInMinutes").and_then(Value::as_u64).unwrap_or(60);
        if minutes > crate::ingress::MAX_TOKEN_MINUTES {
            return Err(ApiError::validation(format!("expirationInMinutes is at most {}", crate::ingress::MAX_TOKEN_MINUTES)));
        }
        let claims =
            crate::ingress::Claims { a: account.to_owned(), m: m.microvm_id.clone(), e: now() as u64 + minutes * 60, p: ports, k: scope };
        Ok(json!({ "authToken": { "X-aws-proxy-auth": self.token_key.issue(&claims) } }))
    }

    /// Applies the image's WORKDIR, ENV and USER to an exec where the caller left them out.
    pub fn apply_image_config(&self, account: &str, ident: &str, req: &mut ExecRequest) {
        if let Some(c) = self.image_config(account, ident) {
            req.cwd = req.cwd.take().or(Some(c.workdir));
            for (k, x) in c.env {
                req.env.entry(k).or_insert(x);
            }
            req.user = req.user.take().or(c.user);
        }
    }

    /// Microvm `ident` of `account` with its lock held, read again under the lock.
    /// Unknown ids (and other tenants') are refused before a lock is made for them.
    async fn locked(&self, account: &str, ident: &str) -> Result<(String, tokio::sync::OwnedMutexGuard<Slot>, MicrovmRecord), ApiError> {
        let id = Self::microvm_id(account, ident);
        self.load(account, &id)?;
        let guard = self.slot(&id).lock_owned().await;
        let m = self.load(account, &id)?;
        Ok((id, guard, m))
    }

    /// The lock of microvm `id`.
    pub fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_owned()).or_default().clone()
    }

    fn microvm_dir(&self, id: &str) -> PathBuf {
        self.state.join("microvms").join(id)
    }

    fn version_dir(&self, account: &str, name: &str, version: u32) -> PathBuf {
        self.state.join("images").join(account).join(name).join(version.to_string())
    }

    /// Resolves a microvm identifier (id or ARN) of `account`.
    fn microvm_id(account: &str, ident: &str) -> String {
        let prefix = format!("arn:{PARTITION}:lambda:{REGION}:{account}:microvm:");
        ident.strip_prefix(&prefix).unwrap_or(ident).to_owned()
    }

    fn load(&self, account: &str, ident: &str) -> Result<MicrovmRecord, ApiError> {
        let id = Self::microvm_id(account, ident);
        self.store.microvm(account, &id).map_err(db)?.ok_or_else(|| ApiError::not_found("Microvm", ident))
    }

    /// Resolves an image identifier (name or ARN) of `account` to its name.
    fn image_name(account: &str, ident: &str) -> Result<String, ApiError> {
        let name = match ident.strip_prefix("arn:") {
            Some(rest) => {
                let prefix = format!("{PARTITION}:lambda:{REGION}:{account}:microvm-image:");
                rest.strip_prefix(&prefix).ok_or_else(|| ApiError::not_found("MicrovmImage", ident))?
            }
            None => ident,
        };
        // Names become directory names: the model's pattern, anchored.
        if !valid_name(name) {
            return Err(ApiError::not_found("MicrovmImage", ident));
        }
        Ok(name.to_owned())
    }

    fn image(&self, account: &str, ident: &str) -> Result<ImageRecord, ApiError> {
        let name = Self::image_name(account, ident)?;
        self.store.image(account, &name).map_err(db)?.ok_or_else(|| ApiError::not_found("MicrovmImage", ident))
    }

    fn version(&self, account: &str, name: &str, version: &str) -> Result<VersionRecord, ApiError> {
        let n: u32 = version.parse().map_err(|_| ApiError::not_found("MicrovmImageVersion", version))?;
        self.store
            .versions(account, name)
            .map_err(db)?
            .into_iter()
            .find(|v| v.version == n)
            .ok_or_else(|| ApiError::not_found("MicrovmImageVersion", &format!("{name}:{version}")))
    }

    // ---- microvms ----

    fn microvm_json(&self, m: &MicrovmRecord) -> Value {
        let mut v = json!({
            "microvmId": m.microvm_id,
            "state": m.state,
            "endpoint": format!("{}/microvms/{}", self.public_url, m.microvm_id),
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
    async fn call_hook(&self, vm: &Vm, m: &MicrovmRecord, which: &str, payload: &str) -> Result<(), String> {
        let Some(v) =
            self.store.versions(&m.account, &m.image_name).ok().and_then(|vs| vs.into_iter().find(|v| v.version == m.image_version))
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

    fn put(&self, m: &MicrovmRecord) -> Result<(), ApiError> {
        self.store.put_microvm(m).map_err(db)
    }

    /// RunMicrovm.
    pub async fn run_microvm(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let versions = self.store.versions(account, &image.name).map_err(db)?;
        let version = match input.get("imageVersion").and_then(Value::as_str) {
            Some(v) => versions.iter().find(|r| r.version.to_string() == v).ok_or_else(|| ApiError::not_found("MicrovmImageVersion", v))?,
            None => versions.iter().rev().find(|r| r.state == "SUCCESSFUL" && r.status == "ACTIVE").ok_or_else(|| {
                ApiError::conflict(
                    "MicrovmImage",
                    &image.name,
                    format!("image {} has no successfully built active version yet", image.name),
                )
            })?,
        };
        if version.state != "SUCCESSFUL" || version.status != "ACTIVE" {
            return Err(ApiError::conflict(
                "MicrovmImageVersion",
                &version.version.to_string(),
                format!(
                    "version {} of {} is {} / {}; only SUCCESSFUL ACTIVE versions run",
                    version.version, image.name, version.state, version.status
                ),
            ));
        }
        let snap = Snapshot::open(&self.version_dir(account, &image.name, version.version).join("snapshot")).map_err(ApiError::internal)?;
        let mut spec = Map::new();
        for k in ["executionRoleArn", "idlePolicy", "kmsKeyIdentifier", "ingressNetworkConnectors", "egressNetworkConnectors", "logging"] {
            if let Some(v) = input.get(k) {
                spec.insert(k.into(), v.clone());
            }
        }
        let t = now();
        let id = format!("mvm-{}", random_hex(8));
        let mut m = MicrovmRecord {
            microvm_id: id.clone(),
            account: account.into(),
            image_name: image.name.clone(),
            image_version: version.version,
            state: "PENDING".into(),
            state_reason: None,
            spec: Value::Object(spec),
            started_at: t,
            terminated_at: None,
            last_activity: t,
            suspended_at: None,
            maximum_duration_in_seconds: input.get("maximumDurationInSeconds").and_then(Value::as_u64).unwrap_or(MAX_DURATION),
            memory_mib: snap.manifest.memory_mib,
            vcpus: snap.manifest.vcpus,
            vm_dir: None,
        };
        let slot = self.slot(&id);
        let mut guard = slot.lock().await;
        self.put(&m)?;
        let started = std::time::Instant::now();
        match Vm::launch(&snap, &self.restore_options(&m, snap.manifest.network.is_some())).await {
            Ok(vm) => {
                m.vm_dir = Some(vm.run_dir().display().to_string());
                // Recorded before the hook: a crash from here on still finds the VM.
                self.put(&m)?;
                let payload = input.get("runHookPayload").and_then(Value::as_str).unwrap_or_default();
                if let Err(e) = self.call_hook(&vm, &m, "run", payload).await {
                    // The app refused to start this microvm: it is not handed out.
                    vm.kill().await;
                    m.state = "TERMINATED".into();
                    m.terminated_at = Some(now());
                    m.state_reason = Some(e);
                    self.put(&m)?;
                    self.metrics.error("run-hook");
                    return Ok(self.microvm_json(&m));
                }
                guard.vm = Some(Arc::new(vm));
                m.state = "RUNNING".into();
                self.put(&m)?;
                self.store.usage_start(&m, "RUNNING", now(), 0).map_err(db)?;
                self.metrics.observe("launch", started.elapsed());
            }
            Err(e) => {
                m.state = "TERMINATED".into();
                m.terminated_at = Some(now());
                m.state_reason = Some(format!("launch failed: {e}"));
                self.put(&m)?;
                self.metrics.error("launch");
            }
        }
        Ok(self.microvm_json(&m))
    }

    /// Records a microvm's egress policy (set through the extension) so resumes keep it.
    pub fn record_egress(&self, account: &str, ident: &str, egress: Value) -> Result<(), ApiError> {
        let m = self.load(account, ident)?;
        self.store.set_spec_field(&m.microvm_id, "hearthEgress", &egress).map_err(db)
    }

    fn restore_options(&self, m: &MicrovmRecord, has_nic: bool) -> RestoreOptions {
        if let Some(e) = m.spec.get("hearthEgress").and_then(|e| serde_json::from_value::<hearth_vmm::net::Egress>(e.clone()).ok()) {
            return RestoreOptions {
                run_root: self.vm_template.run_root.clone(),
                timeout: Duration::from_secs(120),
                hostname: None,
                egress: has_nic.then_some(e),
                detached: true,
            };
        }
        let connectors: Vec<&str> =
            m.spec.get("egressNetworkConnectors").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let egress = has_nic.then(|| {
            if connectors.iter().any(|c| c.contains("INTERNET_EGRESS")) {
                hearth_vmm::net::Egress::internet()
            } else {
                hearth_vmm::net::Egress::none()
            }
        });
        // Detached: microvms outlive the daemon (a crash or an upgrade) and are reattached.
        RestoreOptions {
            run_root: self.vm_template.run_root.clone(),
            timeout: Duration::from_secs(120),
            hostname: None,
            egress,
            detached: true,
        }
    }

    /// GetMicrovm.
    pub async fn get_microvm(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let m = self.load(account, s(&input["microvmIdentifier"]).unwrap_or_default())?;
        Ok(self.microvm_json(&m))
    }

    /// ListMicrovms.
    pub async fn list_microvms(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let limit = input.get("maxResults").and_then(Value::as_u64).map_or(DEFAULT_PAGE, |n| n as usize);
        let mut after = decode_token(input.get("nextToken"))?;
        let image = input.get("imageIdentifier").and_then(Value::as_str).map(|i| Self::image_name(account, i)).transpose()?;
        let version = input.get("imageVersion").and_then(Value::as_str);
        let mut items = Vec::new();
        let mut next = None;
        // Filters apply while paging, so a page is full unless the list ended.
        'outer: loop {
            let batch = self.store.list_microvms(account, after, limit.max(1) * 2).map_err(db)?;
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
        if m.state != "RUNNING" {
            return Err(ApiError::conflict(
                "Microvm",
                &id,
                format!("microvm {id} is {}; only a RUNNING microvm can be suspended", m.state),
            ));
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
        m.state = "SUSPENDING".into();
        self.put(&m)?;
        // The app hears of it first; a failing hook does not stop the suspend.
        let hook_error = self.call_hook(&vm, &m, "suspend", "").await.err();
        let dir = self.microvm_dir(&id).join("suspended");
        let _ = std::fs::create_dir_all(self.microvm_dir(&id));
        let started = std::time::Instant::now();
        match vm.suspend(&dir).await {
            Ok(_) => {
                m.state = "SUSPENDED".into();
                m.suspended_at = Some(now());
                m.state_reason = reason.map(str::to_owned).or(hook_error);
                self.put(&m)?;
                self.store.usage_end(&id, now()).map_err(db)?;
                self.store.usage_start(&m, "SUSPENDED", now(), dir_size(&dir)).map_err(db)?;
                self.metrics.observe("suspend", started.elapsed());
                Ok(json!({}))
            }
            Err((vm, e)) => {
                self.metrics.error("suspend");
                if vm.is_running() {
                    guard.vm = Some(Arc::new(*vm));
                    m.state = "RUNNING".into();
                    m.state_reason = Some(format!("suspend failed: {e}"));
                } else {
                    m.state = "TERMINATED".into();
                    m.terminated_at = Some(now());
                    m.state_reason = Some(format!("the VM died while suspending: {e}"));
                    self.store.usage_end(&id, now()).map_err(db)?;
                }
                self.put(&m)?;
                Err(ApiError::internal(format!("suspend failed: {e}")))
            }
        }
    }

    /// ResumeMicrovm (also used by auto-resume).
    pub async fn resume_microvm(&self, account: &str, ident: &str) -> Result<Value, ApiError> {
        let (_, mut guard, m) = self.locked(account, ident).await?;
        self.resume_locked(&mut guard, m).await.map(|_| json!({}))
    }

    async fn resume_locked(&self, guard: &mut Slot, mut m: MicrovmRecord) -> Result<MicrovmRecord, ApiError> {
        let id = m.microvm_id.clone();
        if m.state != "SUSPENDED" {
            return Err(ApiError::conflict(
                "Microvm",
                &id,
                format!("microvm {id} is {}; only a SUSPENDED microvm can be resumed", m.state),
            ));
        }
        let dir = self.microvm_dir(&id).join("suspended");
        let snap = Snapshot::open(&dir).map_err(|e| ApiError::internal(format!("the suspended state of {id} is unusable: {e}")))?;
        let started = std::time::Instant::now();
        match Vm::resume(&snap, &self.restore_options(&m, snap.manifest.network.is_some())).await {
            Ok(vm) => {
                m.vm_dir = Some(vm.run_dir().display().to_string());
                self.put(&m)?;
                m.state_reason = self.call_hook(&vm, &m, "resume", "").await.err();
                guard.vm = Some(Arc::new(vm));
                guard.cpu = None;
                m.state = "RUNNING".into();
                m.suspended_at = None;
                m.last_activity = now();
                self.put(&m)?;
                self.store.usage_end(&id, now()).map_err(db)?;
                self.store.usage_start(&m, "RUNNING", now(), 0).map_err(db)?;
                self.metrics.observe("resume", started.elapsed());
                Ok(m)
            }
            Err(e) => {
                self.metrics.error("resume");
                Err(ApiError::internal(format!("resume of {id} failed: {e}")))
            }
        }
    }

    /// TerminateMicrovm (also used by the lifetime and idle policies).
    pub async fn terminate_microvm(&self, account: &str, ident: &str, reason: Option<&str>) -> Result<Value, ApiError> {
        let (id, mut guard, mut m) = self.locked(account, ident).await?;
        if m.state == "TERMINATED" {
            return Err(ApiError::conflict("Microvm", &id, format!("microvm {id} is already TERMINATED")));
        }
        m.state = "TERMINATING".into();
        self.put(&m)?;
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
        let _ = std::fs::remove_dir_all(self.microvm_dir(&id));
        m.state = "TERMINATED".into();
        m.terminated_at = Some(now());
        m.state_reason = reason.map(str::to_owned).or(m.state_reason);
        self.put(&m)?;
        self.store.usage_end(&id, now()).map_err(db)?;
        drop(guard);
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(json!({}))
    }

    /// Runs `f` on microvm `ident`'s VM (the Hearth exec/file extensions): counts as
    /// activity, resumes a SUSPENDED microvm first when its idle policy allows.
    pub async fn with_vm<T>(
        &self,
        account: &str,
        ident: &str,
        f: impl for<'a> FnOnce(&'a Vm) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ApiError>> + Send + 'a>>,
    ) -> Result<T, ApiError> {
        let vm = self.vm_handle(account, ident).await?;
        let r = f(&vm).await;
        drop(vm);
        let _ = self.store.touch(&Self::microvm_id(account, ident), now());
        r
    }

    /// A handle on microvm `ident`'s VM for work that runs without its lock (execs,
    /// ingress connections): resumes a SUSPENDED microvm first when its idle policy
    /// allows, and counts as activity. While a handle lives, the VM counts as busy;
    /// Suspend waits for handles to go, Terminate ends them.
    pub async fn vm_handle(&self, account: &str, ident: &str) -> Result<Arc<Vm>, ApiError> {
        let (id, mut guard, mut m) = self.locked(account, ident).await?;
        if m.state == "SUSPENDED" {
            let auto = m.spec.pointer("/idlePolicy/autoResumeEnabled").and_then(Value::as_bool).unwrap_or(false);
            if !auto {
                return Err(ApiError::conflict(
                    "Microvm",
                    &id,
                    format!("microvm {id} is SUSPENDED and its idle policy does not resume it automatically; call ResumeMicrovm"),
                ));
            }
            m = self.resume_locked(&mut guard, m).await?;
        }
        if m.state != "RUNNING" {
            return Err(ApiError::conflict("Microvm", &id, format!("microvm {id} is {}", m.state)));
        }
        self.store.touch(&id, now()).map_err(db)?;
        guard.vm.clone().ok_or_else(|| ApiError::internal("RUNNING without a VM"))
    }

    /// The runtime configuration of the image microvm `ident` runs.
    pub fn image_config(&self, account: &str, ident: &str) -> Option<hearth_image::build::ImageConfig> {
        let m = self.load(account, ident).ok()?;
        self.store.versions(account, &m.image_name).ok()?.into_iter().find(|v| v.version == m.image_version)?.config
    }

    /// Lets every running VM go on without this daemon (its graceful stop); the next
    /// start reattaches them.
    pub async fn release_all(&self) {
        let slots: Vec<_> = self.slots.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for s in slots {
            let mut guard = s.lock().await;
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
    }

    // ---- images ----

    fn version_json(&self, image: &ImageRecord, v: &VersionRecord) -> Value {
        let mut out = v.spec.clone();
        out["imageArn"] = image_arn(&image.account, &image.name).into();
        out["imageVersion"] = v.version.to_string().into();
        out["state"] = v.state.clone().into();
        out["status"] = v.status.clone().into();
        out["createdAt"] = v.created_at.into();
        if let Some(u) = v.updated_at {
            out["updatedAt"] = u.into();
        }
        if let Some(r) = &v.state_reason {
            out["stateReason"] = r.clone().into();
        }
        if let Ok(tags) = self.store.tags(&image_arn(&image.account, &image.name)) {
            if !tags.is_empty() {
                out["tags"] = Value::Object(tags.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
            }
        }
        out
    }

    fn image_json(&self, image: &ImageRecord) -> Result<Value, ApiError> {
        let versions = self.store.versions(&image.account, &image.name).map_err(db)?;
        let mut out = json!({
            "imageArn": image_arn(&image.account, &image.name),
            "name": image.name,
            "state": image.state,
            "createdAt": image.created_at,
        });
        if let Some(v) = versions.iter().rev().find(|v| v.state == "SUCCESSFUL" && v.status == "ACTIVE") {
            out["latestActiveImageVersion"] = v.version.to_string().into();
        }
        if let Some(v) = versions.iter().rev().find(|v| v.state == "FAILED") {
            out["latestFailedImageVersion"] = v.version.to_string().into();
        }
        if let Some(u) = image.updated_at {
            out["updatedAt"] = u.into();
        }
        Ok(out)
    }

    /// CreateMicrovmImage (`update` false) or UpdateMicrovmImage (a new version).
    pub async fn create_image(self: &Arc<Self>, account: &str, input: &Map<String, Value>, update: bool) -> Result<Value, ApiError> {
        let (name, mut image) = if update {
            let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
            (image.name.clone(), image)
        } else {
            let name = s(&input["name"]).unwrap_or_default().to_owned();
            if !valid_name(&name) {
                return Err(ApiError::validation(format!("name {name:?} must be 1-64 letters, digits, '-' or '_'")));
            }
            if self.store.image(account, &name).map_err(db)?.is_some() {
                return Err(ApiError::conflict(
                    "MicrovmImage",
                    &name,
                    format!("an image named {name} exists; UpdateMicrovmImage builds a new version"),
                ));
            }
            (name.clone(), ImageRecord { account: account.into(), name, state: "CREATING".into(), created_at: now(), updated_at: None })
        };
        let base = s(&input["baseImageArn"]).unwrap_or_default();
        let base_name = base.rsplit(':').next().unwrap_or(base);
        let Some((_, base_kind)) = MANAGED.iter().find(|(n, _)| *n == base_name) else {
            return Err(ApiError::validation(format!(
                "baseImageArn {base:?} is not a managed base image ({}); see ListManagedMicrovmImages",
                MANAGED.iter().map(|(n, _)| managed_arn(n)).collect::<Vec<_>>().join(", ")
            )));
        };
        let uri = input.get("codeArtifact").and_then(|c| c.get("uri")).and_then(Value::as_str).unwrap_or_default();
        // Opened now so a bad one is refused here; the build opens it again.
        drop(self.code_artifact(account, uri)?);
        let mut spec = Map::new();
        for (k, v) in input {
            if !matches!(k.as_str(), "name" | "imageIdentifier" | "clientToken" | "tags") {
                spec.insert(k.clone(), v.clone());
            }
        }
        let versions = self.store.versions(account, &name).map_err(db)?;
        let version = versions.last().map_or(1, |v| v.version + 1);
        let t = now();
        let rec = VersionRecord {
            account: account.into(),
            name: name.clone(),
            version,
            state: "PENDING".into(),
            status: "ACTIVE".into(),
            build_id: format!("build-{}", random_hex(8)),
            spec: Value::Object(spec),
            state_reason: None,
            created_at: t,
            updated_at: None,
            snapshot_bytes: None,
            config: None,
        };
        image.state = if update { "UPDATING".into() } else { "CREATING".into() };
        image.updated_at = update.then_some(t);
        self.store.put_image(&image).map_err(db)?;
        self.store.put_version(&rec).map_err(db)?;
        if let Some(tags) = input.get("tags").and_then(Value::as_object) {
            let pairs: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect();
            self.store.tag(&image_arn(account, &name), &pairs).map_err(db)?;
        }
        let svc = self.clone();
        let (rec2, image2, base_kind) = (rec.clone(), image.clone(), *base_kind);
        tokio::spawn(async move { svc.build(image2, rec2, base_kind, update).await });
        let mut out = self.version_json(&image, &rec);
        for (k, v) in self.image_json(&image)?.as_object().into_iter().flatten() {
            out[k] = v.clone();
        }
        if let Some(o) = out.as_object_mut() {
            o.remove("status");
            o.remove("stateReason");
        }
        Ok(out)
    }

    async fn build(self: Arc<Self>, mut image: ImageRecord, mut rec: VersionRecord, base: hearth_image::base::Base, update: bool) {
        rec.state = "IN_PROGRESS".into();
        let _ = self.store.put_version(&rec);
        let dir = self.version_dir(&image.account, &image.name, rec.version);
        let result = self.clone().build_version(&rec, base, &dir).await;
        rec.updated_at = Some(now());
        match result {
            Ok((sizes, config)) => {
                rec.state = "SUCCESSFUL".into();
                rec.snapshot_bytes = Some(sizes);
                rec.config = Some(config);
                image.state = if update { "UPDATED".into() } else { "CREATED".into() };
            }
            Err(e) => {
                tracing::warn!(image = %image.name, version = rec.version, error = %e, "image build failed");
                rec.state = "FAILED".into();
                rec.state_reason = Some(e);
                image.state = if update { "UPDATE_FAILED".into() } else { "CREATE_FAILED".into() };
                let _ = std::fs::remove_dir_all(dir.join("snapshot"));
            }
        }
        image.updated_at = Some(now());
        let _ = self.store.put_version(&rec);
        let _ = self.store.put_image(&image);
    }

    async fn build_version(
        self: Arc<Self>,
        rec: &VersionRecord,
        base: hearth_image::base::Base,
        dir: &std::path::Path,
    ) -> Result<((u64, u64), hearth_image::build::ImageConfig), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let scratch = tempfile::Builder::new().prefix(".ctx-").tempdir_in(dir).map_err(|e| e.to_string())?;
        let uri = rec.spec.pointer("/codeArtifact/uri").and_then(Value::as_str).unwrap_or_default();
        // Held open until the build ends: a directory context is read through it.
        let source = self.code_artifact(&rec.account, uri).map_err(|e| e.message)?;
        let context = match &source {
            artifacts::Source::Local(l) if l.dir => l.path(),
            other => {
                let zip = match other {
                    artifacts::Source::Local(l) => l.path(),
                    artifacts::Source::Remote(u) => {
                        hearth_image::artifact::fetch(u, scratch.path(), Default::default()).await.map_err(|e| e.to_string())?
                    }
                };
                let ctx = scratch.path().join("ctx");
                hearth_image::artifact::extract_zip(&zip, &ctx, Default::default()).map_err(|e| e.to_string())?;
                ctx
            }
        };
        let hooks = rec.spec.get("hooks").cloned().unwrap_or(Value::Null);
        let enabled = |p: &str| hooks.pointer(p).and_then(Value::as_str) != Some("DISABLED");
        let env = rec
            .spec
            .get("environmentVariables")
            .and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
            .unwrap_or_default();
        let req = hearth_image::build::BuildRequest {
            context,
            base,
            env,
            hooks_port: hooks.get("port").and_then(Value::as_u64).unwrap_or(8080) as u16,
            ready_timeout: Duration::from_secs(
                hooks.pointer("/microvmImageHooks/readyTimeoutInSeconds").and_then(Value::as_u64).unwrap_or(120),
            ),
            validate: hooks.pointer("/microvmImageHooks/validate").and_then(Value::as_str) == Some("ENABLED")
                && enabled("/microvmImageHooks/validate"),
            network: hearth_vmm::net::can_network().then(hearth_vmm::net::Egress::internet),
            cache: Some(self.layer_cache(&rec.account)),
            images: Arc::new(artifacts::TenantImages { svc: self.clone(), account: rec.account.clone() }),
        };
        let mut vm = self.vm_template.clone();
        if let Some(m) = rec.spec.pointer("/resources/0/minimumMemoryInMiB").and_then(Value::as_u64) {
            vm.memory_mib = (m as u32).max(hearth_vmm::config::MIN_MEMORY_MIB);
        }
        let log_path = dir.join("build.log");
        let mut log_file = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let mut log = |line: &str| {
            let _ = std::io::Write::write_all(&mut log_file, format!("{line}\n").as_bytes());
        };
        let (snap, config) =
            hearth_image::build::build(&req, vm, &self.home, &dir.join("snapshot"), &mut log).await.map_err(|e| e.to_string())?;
        let mem = snap.manifest.memory.as_ref().map_or(0, |m| m.size);
        Ok(((mem, dir_size(&dir.join("snapshot")).saturating_sub(mem)), config))
    }

    /// GetMicrovmImage.
    pub fn get_image(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let mut out = self.image_json(&image)?;
        let tags = self.store.tags(&image_arn(account, &image.name)).map_err(db)?;
        if !tags.is_empty() {
            out["tags"] = Value::Object(tags.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
        }
        Ok(out)
    }

    /// ListMicrovmImages.
    pub fn list_images(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let filter = input.get("nameFilter").and_then(Value::as_str).unwrap_or("");
        let all: Vec<Value> = self
            .store
            .images(account)
            .map_err(db)?
            .iter()
            .filter(|i| i.name.contains(filter))
            .map(|i| self.image_json(i))
            .collect::<Result<_, _>>()?;
        page(all, input)
    }

    /// DeleteMicrovmImage.
    pub fn delete_image(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let ident = s(&input["imageIdentifier"]).unwrap_or_default();
        let image = self.image(account, ident)?;
        self.refuse_if_in_use(account, &image.name, None)?;
        if self.store.versions(account, &image.name).map_err(db)?.iter().any(|v| v.state == "IN_PROGRESS" || v.state == "PENDING") {
            return Err(ApiError::conflict("MicrovmImage", ident, "a build of this image is in progress"));
        }
        self.store.delete_image(account, &image.name).map_err(db)?;
        self.store
            .untag(
                &image_arn(account, &image.name),
                &self.store.tags(&image_arn(account, &image.name)).map_err(db)?.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .map_err(db)?;
        let _ = std::fs::remove_dir_all(self.state.join("images").join(account).join(&image.name));
        Ok(json!({ "imageIdentifier": ident, "state": "DELETED" }))
    }

    fn refuse_if_in_use(&self, account: &str, name: &str, version: Option<u32>) -> Result<(), ApiError> {
        let users: Vec<String> = self
            .store
            .live_microvms()
            .map_err(db)?
            .into_iter()
            .filter(|m| m.account == account && m.image_name == name && version.is_none_or(|v| v == m.image_version))
            .map(|m| m.microvm_id)
            .collect();
        if users.is_empty() {
            Ok(())
        } else {
            Err(ApiError::conflict("MicrovmImage", name, format!("microvms still use it: {}; terminate them first", users.join(", "))))
        }
    }

    /// GetMicrovmImageVersion.
    pub fn get_version(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let v = self.version(account, &image.name, s(&input["imageVersion"]).unwrap_or_default())?;
        Ok(self.version_json(&image, &v))
    }

    /// ListMicrovmImageVersions.
    pub fn list_versions(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let all = self.store.versions(account, &image.name).map_err(db)?.iter().map(|v| self.version_json(&image, v)).collect();
        page(all, input)
    }

    /// UpdateMicrovmImageVersion (ACTIVE / INACTIVE).
    pub fn update_version(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let mut v = self.version(account, &image.name, s(&input["imageVersion"]).unwrap_or_default())?;
        v.status = s(&input["status"]).unwrap_or("ACTIVE").to_owned();
        v.updated_at = Some(now());
        self.store.put_version(&v).map_err(db)?;
        Ok(self.version_json(&image, &v))
    }

    /// DeleteMicrovmImageVersion.
    pub fn delete_version(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let ident = s(&input["imageIdentifier"]).unwrap_or_default();
        let image = self.image(account, ident)?;
        let v = self.version(account, &image.name, s(&input["imageVersion"]).unwrap_or_default())?;
        if v.state == "IN_PROGRESS" || v.state == "PENDING" {
            return Err(ApiError::conflict("MicrovmImageVersion", &v.version.to_string(), "its build is in progress"));
        }
        self.refuse_if_in_use(account, &image.name, Some(v.version))?;
        self.store.delete_version(account, &image.name, v.version).map_err(db)?;
        let _ = std::fs::remove_dir_all(self.version_dir(account, &image.name, v.version));
        Ok(json!({ "imageIdentifier": ident, "imageVersion": v.version.to_string(), "state": "DELETED" }))
    }

    fn build_json(&self, image: &ImageRecord, v: &VersionRecord) -> Value {
        let mut out = json!({
            "imageArn": image_arn(&image.account, &image.name),
            "imageVersion": v.version.to_string(),
            "buildId": v.build_id,
            "buildState": match v.state.as_str() { "PENDING" | "IN_PROGRESS" | "SUCCESSFUL" | "FAILED" => v.state.as_str(), _ => "SUCCESSFUL" },
            "architecture": "X86_64",
            "chipset": "INTEL",
            "chipsetGeneration": "x86-64",
            "createdAt": v.created_at,
        });
        if let Some(r) = &v.state_reason {
            out["stateReason"] = r.clone().into();
        }
        if let Some((mem, disk)) = v.snapshot_bytes {
            out["snapshotBuild"] = json!({ "memorySnapshotSizeInBytes": mem, "diskSnapshotSizeInBytes": disk });
        }
        out
    }

    /// GetMicrovmImageBuild.
    pub fn get_build(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let v = self.version(account, &image.name, s(&input["imageVersion"]).unwrap_or_default())?;
        let id = s(&input["buildId"]).unwrap_or_default();
        if v.build_id != id {
            return Err(ApiError::not_found("MicrovmImageBuild", id));
        }
        Ok(self.build_json(&image, &v))
    }

    /// ListMicrovmImageBuilds.
    pub fn list_builds(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let image = self.image(account, s(&input["imageIdentifier"]).unwrap_or_default())?;
        let v = self.version(account, &image.name, s(&input["imageVersion"]).unwrap_or_default())?;
        page(vec![self.build_json(&image, &v)], input)
    }

    /// ListManagedMicrovmImages.
    pub fn list_managed(&self, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let items = MANAGED.iter().map(|(n, b)| json!({ "imageArn": managed_arn(n), "createdAt": mtime(&b.path(&self.home)) })).collect();
        page(items, input)
    }

    /// ListManagedMicrovmImageVersions.
    pub fn list_managed_versions(&self, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let ident = s(&input["imageIdentifier"]).unwrap_or_default();
        let name = ident.rsplit(':').next().unwrap_or(ident);
        let (n, b) = MANAGED.iter().find(|(n, _)| *n == name).ok_or_else(|| ApiError::not_found("ManagedMicrovmImage", ident))?;
        let items = vec![json!({
            "imageArn": managed_arn(n),
            "imageVersion": "1",
            "status": "ACTIVE",
            "supportedCpuConfigurations": [{ "architecture": "X86_64" }],
            "createdAt": mtime(&b.path(&self.home)),
        })];
        page(items, input)
    }

    // ---- tags ----

    fn taggable(&self, account: &str, arn: &str) -> Result<String, ApiError> {
        let prefix = format!("arn:{PARTITION}:lambda:{REGION}:{account}:microvm-image:");
        let name = arn.strip_prefix(&prefix).ok_or_else(|| ApiError::not_found("Resource", arn))?;
        self.store.image(account, name).map_err(db)?.ok_or_else(|| ApiError::not_found("Resource", arn))?;
        Ok(arn.to_owned())
    }

    /// ListTags.
    pub fn list_tags(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let arn = self.taggable(account, s(&input["Resource"]).unwrap_or_default())?;
        let tags: Map<String, Value> = self.store.tags(&arn).map_err(db)?.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        Ok(json!({ "Tags": tags }))
    }

    /// TagResource.
    pub fn tag(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let arn = self.taggable(account, s(&input["Resource"]).unwrap_or_default())?;
        let pairs: Vec<(String, String)> =
            input["Tags"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect();
        let existing = self.store.tags(&arn).map_err(db)?;
        let total = existing.iter().map(|(k, _)| k).chain(pairs.iter().map(|(k, _)| k)).collect::<std::collections::BTreeSet<_>>().len();
        if total > 50 {
            return Err(ApiError::validation("a resource has at most 50 tags"));
        }
        self.store.tag(&arn, &pairs).map_err(db)?;
        Ok(Value::Null)
    }

    /// UntagResource.
    pub fn untag(&self, account: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
        let arn = self.taggable(account, s(&input["Resource"]).unwrap_or_default())?;
        let keys: Vec<String> = input["TagKeys"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
        self.store.untag(&arn, &keys).map_err(db)?;
        Ok(Value::Null)
    }

    // ---- policies ----

    /// One pass of the lifetime and idle policies over every live microvm.
    pub async fn enforce_policies(&self) {
        let Ok(live) = self.store.live_microvms() else { return };
        let t = now();
        for m in live {
            let (acct, id) = (m.account.clone(), m.microvm_id.clone());
            if t - m.started_at >= m.maximum_duration_in_seconds as f64 {
                let _ = self.terminate_microvm(&acct, &id, Some("maximumDurationInSeconds reached")).await;
                continue;
            }
            let policy = m.spec.get("idlePolicy");
            let idle_max = policy.and_then(|p| p["maxIdleDurationSeconds"].as_u64());
            let suspended_max = policy.and_then(|p| p["suspendedDurationSeconds"].as_u64());
            match m.state.as_str() {
                "RUNNING" => {
                    let Some(idle_max) = idle_max else { continue };
                    if self.guest_active(&acct, &id).await {
                        continue;
                    }
                    let last = self.store.microvm(&acct, &id).ok().flatten().map_or(m.last_activity, |r| r.last_activity);
                    if t - last >= idle_max as f64 {
                        if suspended_max == Some(0) {
                            let _ = self
                                .terminate_microvm(&acct, &id, Some("idle for maxIdleDurationSeconds (suspendedDurationSeconds is 0)"))
                                .await;
                        } else if let Err(e) =
                            self.suspend_microvm(&acct, &id, Some("suspended after maxIdleDurationSeconds without activity")).await
                        {
                            tracing::warn!(microvm = %id, error = %e, "idle suspend failed");
                        }
                    }
                }
                "SUSPENDED" => {
                    if let (Some(max), Some(since)) = (suspended_max, m.suspended_at) {
                        if t - since >= max as f64 {
                            let _ = self.terminate_microvm(&acct, &id, Some("suspended for suspendedDurationSeconds")).await;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Guest work since the last look: running API execs, or QEMU using more than 5 % of a
    /// core (an idle guest costs ~1 %). Counts as activity (and records it).
    async fn guest_active(&self, account: &str, id: &str) -> bool {
        let slot = self.slot(id);
        let Ok(mut guard) = slot.try_lock() else { return true };
        if guard.vm.as_ref().is_some_and(|v| Arc::strong_count(v) > 1) {
            // Execs in flight.
            return true;
        }
        let Some(pid) = guard.vm.as_ref().map(|v| v.pid()) else { return false };
        let Some(ticks) = cpu_ticks(pid) else { return false };
        let t = now();
        let active = match guard.cpu {
            Some((prev, at)) if t > at => (ticks.saturating_sub(prev) as f64 / clock_ticks()) / (t - at) > 0.05,
            // No earlier sample (just started or resumed): not known to be idle.
            _ => true,
        };
        guard.cpu = Some((ticks, t));
        drop(guard);
        if active {
            let _ = self.store.touch(id, t);
        }
        let _ = account;
        active
    }

    /// After a restart: RUNNING microvms are reattached (their QEMU outlived the previous
    /// daemon); SUSPENDED ones stay when their state is on disk. Any other — a QEMU that
    /// died, a state lost half-way (a transitional state) — is TERMINATED with the reason.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        // Builds cut off by the stop: FAILED, their partial files gone.
        for mut v in self.store.unfinished_versions().map_err(db)? {
            v.state = "FAILED".into();
            v.state_reason = Some("the build was interrupted by a daemon restart; UpdateMicrovmImage builds again".into());
            v.updated_at = Some(now());
            let _ = std::fs::remove_dir_all(self.version_dir(&v.account, &v.name, v.version));
            self.store.put_version(&v).map_err(db)?;
            if let Some(mut i) = self.store.image(&v.account, &v.name).map_err(db)? {
                if i.state == "CREATING" || i.state == "UPDATING" {
                    i.state = if i.state == "CREATING" { "CREATE_FAILED".into() } else { "UPDATE_FAILED".into() };
                    self.store.put_image(&i).map_err(db)?;
                }
            }
        }
        for mut m in self.store.live_microvms().map_err(db)? {
            let ok = match m.state.as_str() {
                "SUSPENDED" => self.microvm_dir(&m.microvm_id).join("suspended").join("manifest.json").is_file(),
                "RUNNING" => match &m.vm_dir {
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
                let was = m.state.clone();
                m.state = "TERMINATED".into();
                m.terminated_at = Some(now());
                let why = m.state_reason.take().unwrap_or_else(|| format!("it was {was} when the previous Hearth daemon stopped"));
                m.state_reason = Some(why);
                if let Some(d) = &m.vm_dir {
                    // Whatever is left of its VM goes (a QEMU that lost its agent, files).
                    if let Ok(vm) = Vm::reattach(std::path::Path::new(d)).await {
                        vm.kill().await;
                    }
                }
                self.put(&m)?;
                self.store.usage_end(&m.microvm_id, now()).map_err(db)?;
                let _ = std::fs::remove_dir_all(self.microvm_dir(&m.microvm_id));
            }
        }
        Ok(())
    }
}

fn page(all: Vec<Value>, input: &Map<String, Value>) -> Result<Value, ApiError> {
    let limit = input.get("maxResults").and_then(Value::as_u64).map_or(DEFAULT_PAGE, |n| n as usize).max(1);
    let start = decode_token(input.get("nextToken"))? as usize;
    let items: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    let mut out = json!({ "items": items });
    if start + limit < all.len() {
        out["nextToken"] = encode_token((start + limit) as i64).into();
    }
    Ok(out)
}

/// Pagination tokens: an opaque position.
fn encode_token(pos: i64) -> String {
    format!("p{pos:x}")
}

fn decode_token(v: Option<&Value>) -> Result<i64, ApiError> {
    match v.and_then(Value::as_str) {
        None => Ok(0),
        Some(t) => t
            .strip_prefix('p')
            .and_then(|h| i64::from_str_radix(h, 16).ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::validation(format!("nextToken {t:?} is not a token this API returned"))),
    }
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum()
}

fn mtime(p: &std::path::Path) -> f64 {
    std::fs::metadata(p).and_then(|m| m.modified()).ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64())
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// The error for operations Hearth does not know.
pub fn unknown_operation(op: &str) -> ApiError {
    ApiError::new(Kind::UnknownOperation, format!("{op} is not an operation of this Hearth server"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_token(Some(&Value::String(encode_token(1234)))).unwrap(), 1234);
        assert!(decode_token(Some(&Value::String("zz".into()))).is_err());
        assert!(decode_token(Some(&Value::String("p-1".into()))).is_err());
        let all: Vec<Value> = (0..5).map(Value::from).collect();
        let mut input = Map::new();
        input.insert("maxResults".into(), 2.into());
        let p1 = page(all.clone(), &input).unwrap();
        assert_eq!(p1["items"], json!([0, 1]));
        input.insert("nextToken".into(), p1["nextToken"].clone());
        let p2 = page(all.clone(), &input).unwrap();
        assert_eq!(p2["items"], json!([2, 3]));
        input.insert("nextToken".into(), p2["nextToken"].clone());
        let p3 = page(all, &input).unwrap();
        assert_eq!(p3["items"], json!([4]));
        assert!(p3.get("nextToken").is_none());
    }

    #[test]
    fn arns_match_the_model_patterns() {
        let re = regex::Regex::new("arn:[a-z0-9-]+:lambda:[a-z0-9-]*:[a-z0-9]*:microvm-image:.+").unwrap();
        assert!(re.is_match(&image_arn("123456789012", "web")));
        assert!(re.is_match(&managed_arn("debian-bookworm")));
        let taggable = regex::Regex::new(
            r"arn:(aws[a-zA-Z-]*):lambda:(eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:\d{12}:(microvm-image):[a-zA-Z0-9-_]+",
        )
        .unwrap();
        assert!(taggable.is_match(&image_arn("123456789012", "web")));
    }
}
