//! The control plane's state, behind one trait, [`MetadataStore`]: tenants and their access
//! keys, microvms, images and their versions, tags, idempotency records and usage. The
//! service is its only caller; [`Store`] (SQLite, [`sqlite`]) implements it, and a
//! PostgreSQL back end for stateless API servers would implement the same trait.
//!
//! The trait's methods return boxed futures ([`StoreFuture`]) rather than being `async fn`s:
//! a trait with `async fn`s cannot be a trait object, and the service holds its store as
//! `Box<dyn MetadataStore>`, so the back end is chosen at start-up without a type parameter
//! on `Service` (and on everything that holds one). A box per call costs nothing next to a
//! database write.
//!
//! Every change is written before the action it announces is taken (a crash then leaves a
//! state the daemon reconciles on start); a microvm's change of state and its usage meter
//! are written together ([`MetadataStore::put_microvm_metered`]).

use crate::lifecycle::{MicrovmImageState, MicrovmImageVersionState, MicrovmImageVersionStatus, MicrovmState};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

mod accounts;
pub use accounts::AccountSettings;

mod connectors;
mod docs;
pub use connectors::{ConnectorRecord, OPERATOR};
mod idempotency;
pub use idempotency::IDEMPOTENCY_TTL;

mod sealing;
pub mod sqlite;
mod sqlite_trait;
pub use sqlite::{create_state_dir, DbResult, OpenError, Store, SCHEMA_VERSION};

/// A failure of the store's back end (an internal error to clients).
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct StoreError(Box<dyn std::error::Error + Send + Sync>);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(Box::new(e))
    }
}

/// What the store's methods return: a future of the result, borrowing the arguments.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A tenant's access key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessKey {
    /// Access key id.
    pub access_key: String,
    /// Secret.
    pub secret: String,
    /// The tenant's 12-digit account id.
    pub account: String,
}

/// A microvm as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmRecord {
    /// Id (`mvm-…`).
    pub microvm_id: String,
    /// Owner.
    pub account: String,
    /// Image name.
    pub image_name: String,
    /// Image version.
    pub image_version: u32,
    /// Its state (stored as the model's name).
    pub state: MicrovmState,
    /// Why it is in that state (failures).
    pub state_reason: Option<String>,
    /// The RunMicrovm request's settings (idlePolicy, connectors, …) as given.
    pub spec: serde_json::Value,
    /// Seconds since the epoch.
    pub started_at: f64,
    /// When it ended.
    pub terminated_at: Option<f64>,
    /// Last API call or guest work.
    pub last_activity: f64,
    /// When it was suspended.
    pub suspended_at: Option<f64>,
    /// Limit of its whole life, suspended time included.
    pub maximum_duration_in_seconds: u64,
    /// Guest memory and vCPUs (for metering).
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The run directory of its VM while RUNNING (to reattach after a restart).
    #[serde(default)]
    pub vm_dir: Option<String>,
}

/// An image and its versions' common settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// Owner.
    pub account: String,
    /// Name.
    pub name: String,
    /// Its state (stored as the model's name).
    pub state: MicrovmImageState,
    /// Seconds since the epoch.
    pub created_at: f64,
    /// Last change.
    pub updated_at: Option<f64>,
}

/// One version of an image: the request it was built from, and how the build went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionRecord {
    /// Owner.
    pub account: String,
    /// Image name.
    pub name: String,
    /// Version number.
    pub version: u32,
    /// Its state and its build's (stored as the model's name).
    pub state: MicrovmImageVersionState,
    /// ACTIVE or INACTIVE.
    pub status: MicrovmImageVersionStatus,
    /// The build's id.
    pub build_id: String,
    /// The CreateMicrovmImage/UpdateMicrovmImage request's settings.
    pub spec: serde_json::Value,
    /// Why it failed.
    pub state_reason: Option<String>,
    /// Seconds since the epoch.
    pub created_at: f64,
    /// Last change.
    pub updated_at: Option<f64>,
    /// Sizes of the snapshot once built: memory, disk.
    pub snapshot_bytes: Option<(u64, u64)>,
    /// Bytes of the code installed by the build (its context's files), once built.
    #[serde(default)]
    pub code_bytes: Option<u64>,
    /// The built image's runtime configuration (ENV, WORKDIR, USER, app).
    #[serde(default)]
    pub config: Option<hearth_image::build::ImageConfig>,
}

/// What a microvm's change of state does to its usage meter.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Meter {
    /// Closes its open period.
    pub close: bool,
    /// Opens a period: RUNNING, or SUSPENDED with the bytes of its saved state.
    pub open: Option<(MicrovmState, u64)>,
}

/// Metered usage.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// vCPU-seconds while RUNNING.
    pub vcpu_seconds: f64,
    /// Memory GiB-seconds while RUNNING.
    pub gib_seconds: f64,
    /// Snapshot storage GiB-hours while SUSPENDED.
    pub snapshot_gib_hours: f64,
}

/// What the service needs of a store. Every method is one transaction; records are
/// scoped to their tenant (`account`) except where a method says "all tenants".
pub trait MetadataStore: Send + Sync {
    /// The access key `access_key` with its secret opened (`None` also when it does not open).
    fn key<'a>(&'a self, access_key: &'a str) -> StoreFuture<'a, Option<AccessKey>>;
    /// Writes document `kind`/`account`/`name` (JSON); with `create_only`, only
    /// when there is none yet, saying whether it did.
    fn put_doc<'a>(&'a self, kind: &'a str, account: &'a str, name: &'a str, doc: &'a str, create_only: bool) -> StoreFuture<'a, bool>;
    /// Document `kind`/`account`/`name`.
    fn doc<'a>(&'a self, kind: &'a str, account: &'a str, name: &'a str) -> StoreFuture<'a, Option<String>>;
    /// `account`'s documents of `kind` whose name starts with `prefix`, by name.
    fn docs<'a>(&'a self, kind: &'a str, account: &'a str, prefix: &'a str) -> StoreFuture<'a, Vec<(String, String)>>;
    /// Deletes document `kind`/`account`/`name`; false when there was none.
    fn delete_doc<'a>(&'a self, kind: &'a str, account: &'a str, name: &'a str) -> StoreFuture<'a, bool>;
    /// True when any access key exists (usable or not).
    fn has_keys(&self) -> StoreFuture<'_, bool>;
    /// Adds a key (its secret sealed at rest).
    fn add_key<'a>(&'a self, k: &'a AccessKey) -> StoreFuture<'a, ()>;
    /// The operator's settings of `account` (the defaults when none were set).
    fn account_settings<'a>(&'a self, account: &'a str) -> StoreFuture<'a, AccountSettings>;

    /// Inserts or replaces a microvm (a change that is not one of state).
    fn put_microvm<'a>(&'a self, m: &'a MicrovmRecord) -> StoreFuture<'a, ()>;
    /// A microvm's change of state: its record and the usage meter's change, together.
    fn put_microvm_metered<'a>(&'a self, m: &'a MicrovmRecord, meter: Meter, now: f64) -> StoreFuture<'a, ()>;
    /// Records activity on a microvm (that field only: never overwrites a concurrent change of state).
    fn touch<'a>(&'a self, id: &'a str, t: f64) -> StoreFuture<'a, ()>;
    /// Sets one member of a microvm's `spec` (that field only, as `touch`).
    fn set_spec_field<'a>(&'a self, id: &'a str, key: &'a str, value: &'a serde_json::Value) -> StoreFuture<'a, ()>;
    /// A microvm of `account`.
    fn microvm<'a>(&'a self, account: &'a str, id: &'a str) -> StoreFuture<'a, Option<MicrovmRecord>>;
    /// A page of `account`'s microvms after position `after`, `limit` long, each with its position.
    fn list_microvms<'a>(&'a self, account: &'a str, after: i64, limit: usize) -> StoreFuture<'a, Vec<(i64, MicrovmRecord)>>;
    /// Creates or replaces a named egress connector.
    fn put_connector<'a>(&'a self, c: &'a ConnectorRecord) -> StoreFuture<'a, ()>;
    /// Connector `name` of `account` (or of [`OPERATOR`]).
    fn connector<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, Option<ConnectorRecord>>;
    /// `account`'s connectors; all tenants' and the operator's with `None`.
    fn connectors<'a>(&'a self, account: Option<&'a str>) -> StoreFuture<'a, Vec<ConnectorRecord>>;
    /// Deletes a connector; false when there was none.
    fn delete_connector<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, bool>;
    /// Every microvm not TERMINATED (all tenants).
    fn live_microvms(&self) -> StoreFuture<'_, Vec<MicrovmRecord>>;
    /// Microvms by state (all tenants).
    fn count_by_state(&self) -> StoreFuture<'_, Vec<(String, i64)>>;

    /// Inserts or replaces an image.
    fn put_image<'a>(&'a self, i: &'a ImageRecord) -> StoreFuture<'a, ()>;
    /// An image.
    fn image<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, Option<ImageRecord>>;
    /// `account`'s images, by name.
    fn images<'a>(&'a self, account: &'a str) -> StoreFuture<'a, Vec<ImageRecord>>;
    /// Removes an image and its versions.
    fn delete_image<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, ()>;
    /// Inserts or replaces a version.
    fn put_version<'a>(&'a self, v: &'a VersionRecord) -> StoreFuture<'a, ()>;
    /// The versions of an image, oldest first.
    fn versions<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, Vec<VersionRecord>>;
    /// Versions whose build has not ended (all tenants).
    fn unfinished_versions(&self) -> StoreFuture<'_, Vec<VersionRecord>>;
    /// Removes one version.
    fn delete_version<'a>(&'a self, account: &'a str, name: &'a str, version: u32) -> StoreFuture<'a, ()>;

    /// Tags of a resource, by key.
    fn tags<'a>(&'a self, arn: &'a str) -> StoreFuture<'a, Vec<(String, String)>>;
    /// Sets tags.
    fn tag<'a>(&'a self, arn: &'a str, tags: &'a [(String, String)]) -> StoreFuture<'a, ()>;
    /// Removes tags.
    fn untag<'a>(&'a self, arn: &'a str, keys: &'a [String]) -> StoreFuture<'a, ()>;

    /// Claims `token` for a call with `hash`: `None` when this call now owns it, else the
    /// earlier call's hash and response (empty while it runs), until it expires.
    fn claim<'a>(&'a self, account: &'a str, op: &'a str, token: &'a str, hash: &'a str) -> StoreFuture<'a, Option<(String, String)>>;
    /// Releases a claim whose call failed.
    fn unclaim<'a>(&'a self, account: &'a str, op: &'a str, token: &'a str) -> StoreFuture<'a, ()>;
    /// Records an idempotent call's response.
    fn remember<'a>(&'a self, account: &'a str, op: &'a str, token: &'a str, hash: &'a str, response: &'a str) -> StoreFuture<'a, ()>;

    /// Usage of `account` between `from` and `to` (seconds since the epoch), periods still
    /// open counted to `now`.
    fn usage<'a>(&'a self, account: &'a str, from: f64, to: f64, now: f64) -> StoreFuture<'a, Usage>;
}
