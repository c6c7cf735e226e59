//! The operations: microvm lifecycle, images and their builds, tags — each handler gets an
//! input the model has already validated, as its typed form ([`crate::inputs`]), and the
//! caller's account. [`Service`] is the only
//! caller of the store and of the engine; the HTTP side ([`crate::server`]) speaks to it.
//!
//! One file per concern: `microvms` (run, get, list, suspend, resume, terminate),
//! `transitions` (the one way a microvm, version or image changes state), `images`
//! (images and their versions), `builds`, `tags`, `tokens` (endpoint and shell tokens),
//! `policies` (idle, lifetime), `reconcile` (on start), `faults` (QEMU exits nobody asked
//! for, failed suspends and resumes told as the model's errors), `extensions` (exec, files, egress,
//! usage), `accounts` (access keys, idempotency claims, counts), `artifacts` (code
//! artifacts and `FROM` images of builds), `arch` (the guest architecture of versions) and
//! `forks` (a running microvm copied into a new one).
//!
//! Every microvm has a slot with an async lock; an operation on a microvm holds it from
//! reading the record to writing the result, so calls on one microvm serialize and each
//! sees the state the previous one left. The transitional state (SUSPENDING, TERMINATING…)
//! is written before the action, the final one after it.

mod accounts;
mod arch;
mod artifacts;
mod build_queue;
mod builds;
mod connectors;
mod extensions;
mod faults;
mod forks;
mod iam;
mod images;
mod imds;
mod kms;
mod microvms;
mod policies;
mod pools;
mod quotas;
mod reconcile;
mod secrets;
mod secrets_doc;
#[cfg(test)]
mod secrets_tests;
mod sessions;
mod suspend_crypt;
mod tags;
mod template_crypt;
mod tokens;
mod transfer;
mod transitions;

pub use arch::api_name as architecture_name;
pub use build_queue::default_max_concurrent_builds;
pub use builds::{TAG_BUILD_TIMEOUT, TAG_STEP_TIMEOUT};
pub use connectors::{connector_arn, connector_from, connector_json, Connectors, MAX_CIDRS, MAX_CONNECTORS};
pub use extensions::{egress_from, set_egress_ceiling, ExecLine};
pub use iam::{parse_role_arn, NewRole, Role, SessionCredentials, MAX_TAGS as MAX_ROLE_TAGS};
pub use images::MANAGED;
pub use microvms::{DefaultEgress, Slot};
pub use pools::{PoolSettings, Pools, MAX_POOL_SIZE, POOL_SIZE_TAG};
pub use sessions::{SessionRefusal, SESSION_PREFIX};
pub use tokens::{MAX_INGRESS_CONNECTIONS, SHELL_INGRESS};
pub use transfer::{Download, TRANSFER_CHUNKS};

use crate::error::{ApiError, Kind};
use crate::store::{ImageRecord, MetadataStore, MicrovmRecord, VersionRecord};
use hearth_vmm::VmConfig;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

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
    hearth_proto::image::valid_name(name)
}

/// The service: the only caller of the store and of the engine.
pub struct Service {
    /// The store (only the service reads and writes it).
    store: Box<dyn MetadataStore>,
    /// `$HEARTH_HOME`.
    pub home: PathBuf,
    /// The API's state directory.
    pub state: PathBuf,
    /// The daemon's URL as clients reach it (the path form of endpoints is under it).
    pub public_url: String,
    /// How microvm endpoints are named (`<id>.<domain>`).
    pub endpoints: crate::endpoint::Endpoints,
    /// Kernel, initramfs, accelerator, run directory of every VM.
    pub vm_template: VmConfig,
    /// The architecture of image versions whose request names none (`arch`; the host's
    /// by default, `hearth serve --default-architecture`).
    pub default_arch: hearth_vmm::Arch,
    slots: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    /// Counters and latency samples for /metrics.
    pub metrics: crate::metrics::Metrics,
    /// Signs and checks ingress tokens.
    pub token_key: crate::ingress::TokenKey,
    ingress: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Microvms the start-up reconcile has not settled yet ([`Service::mark_recovering`]):
    /// read from their record, changed by nothing else until it has.
    recovering: std::sync::Mutex<std::collections::HashSet<String>>,
    /// What the host can hold, all tenants together.
    pub capacity: crate::capacity::Capacity,
    /// The request rate of accounts the operator set none for.
    pub default_rate: crate::ratelimit::Rate,
    /// Every account's request bucket.
    limiter: crate::ratelimit::Limiter,
    /// Held from the quota and capacity checks of a new microvm or build until its record
    /// is written: two calls never both take the last unit.
    admission: tokio::sync::Mutex<()>,
    /// Suspended microvms whose resume was admitted and has not ended.
    resuming: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Warm pools behind RunMicrovm (`pools`).
    pub pools: Pools,
    /// The egress of a microvm whose run and image name no connector
    /// (`hearth serve --default-egress`; INTERNET_EGRESS, as on the service).
    pub default_egress: DefaultEgress,
    /// Named egress connectors as last loaded (`connectors`).
    connectors: Connectors,
    /// Builds queued and running: the bound on how many run at once, and how to cancel each.
    builds: build_queue::Builds,
    /// The service itself, for the tasks that watch each VM's QEMU ([`Self::shared`]).
    me: std::sync::Weak<Service>,
}

/// What a change of state does to the record's `stateReason`.
enum Reason {
    /// Leaves it.
    Keep,
    /// Replaces it (`None` clears it).
    Set(Option<String>),
}

impl Service {
    /// A service over `store`.
    pub fn new(
        store: impl MetadataStore + 'static,
        home: PathBuf,
        state: PathBuf,
        vm_template: VmConfig,
        token_key: crate::ingress::TokenKey,
    ) -> Self {
        let capacity = crate::capacity::Capacity::measure(&Default::default(), &state);
        Service {
            store: Box::new(store),
            home,
            state,
            public_url: String::new(),
            endpoints: Default::default(),
            vm_template,
            default_arch: hearth_vmm::Arch::host(),
            slots: Default::default(),
            metrics: Default::default(),
            token_key,
            ingress: Default::default(),
            recovering: Default::default(),
            capacity,
            default_rate: Default::default(),
            limiter: Default::default(),
            admission: Default::default(),
            resuming: Default::default(),
            pools: Default::default(),
            default_egress: Default::default(),
            connectors: Default::default(),
            builds: Default::default(),
            me: std::sync::Weak::new(),
        }
    }

    /// The service, shared: the form the daemon runs it in. Only a service made this way
    /// notices a QEMU that exits on its own (its watchers reach the service through it).
    pub fn shared(self) -> Arc<Service> {
        Arc::new_cyclic(|me| Service { me: me.clone(), ..self })
    }

    /// Microvm `ident` of `account` with its lock held, read again under the lock.
    /// Unknown ids (and other tenants') are refused before a lock is made for them.
    async fn locked(&self, account: &str, ident: &str) -> Result<(String, tokio::sync::OwnedMutexGuard<Slot>, MicrovmRecord), ApiError> {
        let id = Self::microvm_id(account, ident);
        self.load(account, &id).await?;
        self.check_not_recovering(&id)?;
        let guard = self.slot(&id).lock_owned().await;
        let m = self.load(account, &id).await?;
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

    async fn load(&self, account: &str, ident: &str) -> Result<MicrovmRecord, ApiError> {
        let id = Self::microvm_id(account, ident);
        self.store.microvm(account, &id).await?.ok_or_else(|| ApiError::not_found("Microvm", ident))
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

    async fn image(&self, account: &str, ident: &str) -> Result<ImageRecord, ApiError> {
        let name = Self::image_name(account, ident)?;
        self.store.image(account, &name).await?.ok_or_else(|| ApiError::not_found("MicrovmImage", ident))
    }

    async fn version(&self, account: &str, name: &str, version: &str) -> Result<VersionRecord, ApiError> {
        let n: u32 = version.parse().map_err(|_| ApiError::not_found("MicrovmImageVersion", version))?;
        self.store
            .versions(account, name)
            .await?
            .into_iter()
            .find(|v| v.version == n)
            .ok_or_else(|| ApiError::not_found("MicrovmImageVersion", &format!("{name}:{version}")))
    }
}

/// The page size a request asks for (`maxResults`), or the default.
fn page_size(max_results: Option<i64>) -> usize {
    max_results.and_then(|n| usize::try_from(n).ok()).unwrap_or(DEFAULT_PAGE)
}

/// The page of `all` that `maxResults` and `nextToken` select, with the next token.
fn page(all: Vec<Value>, max_results: Option<i64>, next_token: Option<&str>) -> Result<Value, ApiError> {
    let limit = page_size(max_results).max(1);
    let start = decode_token(next_token)? as usize;
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

fn decode_token(v: Option<&str>) -> Result<i64, ApiError> {
    match v {
        None => Ok(0),
        Some(t) => t
            .strip_prefix('p')
            .and_then(|h| i64::from_str_radix(h, 16).ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::validation(format!("nextToken {t:?} is not a token this API returned"))),
    }
}

/// Disk a suspended microvm holds: its snapshot directory without `memory`, the link to its
/// image's template RAM file that the image already counts (`hearth_vmm::snapshot`).
fn suspended_size(p: &std::path::Path) -> u64 {
    let base = std::fs::metadata(p.join("memory")).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
    dir_size(p).saturating_sub(base)
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

/// The error for operations Hearth does not know.
pub fn unknown_operation(op: &str) -> ApiError {
    ApiError::new(Kind::UnknownOperation, format!("{op} is not an operation of this Hearth server"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_token(Some(&encode_token(1234))).unwrap(), 1234);
        assert!(decode_token(Some("zz")).is_err());
        assert!(decode_token(Some("p-1")).is_err());
        let all: Vec<Value> = (0..5).map(Value::from).collect();
        let p1 = page(all.clone(), Some(2), None).unwrap();
        assert_eq!(p1["items"], json!([0, 1]));
        let p2 = page(all.clone(), Some(2), p1["nextToken"].as_str()).unwrap();
        assert_eq!(p2["items"], json!([2, 3]));
        let p3 = page(all, Some(2), p2["nextToken"].as_str()).unwrap();
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
