//! Code artifacts: the zip (or directory) a build starts from, with its `Dockerfile` at the
//! root. Archives come from users, so extraction trusts nothing: entry names are checked
//! (no absolute paths, no `..`, no NUL or backslash), every entry is written beneath the
//! destination without passing through a link ([`crate::beneath`]: links in the archive
//! become links, never followed on the host), devices, FIFOs and sockets are refused, the
//! number of entries and the bytes actually written are capped (declared sizes can lie: a
//! zip bomb is stopped by what it writes, not what it claims), and a failure removes what
//! was extracted.
//!
//! [`fetch`] brings an artifact named by a URI onto the host first: local paths and
//! `file://` URIs are used in place; `http://` and `https://` bodies are downloaded into a
//! directory the caller owns, streamed chunk by chunk under the same byte limit (counted
//! on what arrives, since a Content-Length can lie or be absent), with connect and overall
//! timeouts and a bounded number of redirects. A failed download leaves no file behind.
//! Tenants' downloads reach public addresses only, checked at the first URL and every
//! redirect, and run from a network namespace of their own when the process is root
//! ([`FetchPolicy`]).
//! Errors show the URI without its password and query string, which often carry
//! credentials (presigned URLs).

use crate::RootfsError;
use std::path::PathBuf;
use std::time::Duration;

/// How long opening a connection to an artifact's server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole download (redirects, headers and body) may take.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Most redirects followed for one download.
pub const MAX_REDIRECTS: usize = 5;

/// Limits on one artifact.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes written in all.
    pub max_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
}

/// Most bytes an artifact may hold by default (downloaded, and written by extraction).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: DEFAULT_MAX_BYTES, max_entries: 100_000 }
    }
}

/// Why an artifact was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// An entry would land outside the extraction directory.
    #[error("archive entry {0:?} names a path outside the archive (absolute, or with `..`)")]
    Escape(String),
    /// An entry extraction refuses: one that would pass through a symbolic link, replace
    /// or duplicate an earlier entry, is a device, FIFO or socket, or has a name or link
    /// target that cannot be extracted as is.
    #[error("archive entry {entry:?} is refused: {reason}")]
    BadEntry {
        /// The entry's name inside the archive.
        entry: String,
        /// Why, and what to change.
        reason: String,
    },
    /// The archive's structure cannot be read (truncated, corrupt, not a zip).
    #[error("the code artifact is not a readable zip archive ({0}); upload a zip file with the Dockerfile at its root")]
    Corrupt(String),
    /// Too big, or too many entries.
    #[error("archive exceeds its limit: {0}")]
    TooLarge(String),
    /// No Dockerfile at the root.
    #[error("the code artifact has no Dockerfile at its root")]
    NoDockerfile,
    /// A URI scheme Hearth cannot fetch.
    #[error("unsupported code artifact location {0:?}: use a local path, a file://, http:// or https:// URI")]
    Scheme(String),
    /// An http(s) URI that does not parse.
    #[error("code artifact URI {uri} is not a valid URL: {reason}")]
    BadUri {
        /// The URI, password and query redacted.
        uri: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The server answered with a status other than 2xx (after redirects).
    #[error("fetching {uri} failed: the server answered HTTP {status}")]
    Status {
        /// The URI, password and query redacted.
        uri: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The body is larger than [`Limits::max_bytes`], by its Content-Length or by what
    /// arrived.
    #[error("{uri} is larger than the {limit}-byte limit on code artifacts")]
    DownloadTooLarge {
        /// The URI, password and query redacted.
        uri: String,
        /// The limit.
        limit: u64,
    },
    /// The download failed: no connection, a timeout, too many redirects, a broken transfer.
    #[error("fetching {uri} failed: {what}")]
    Fetch {
        /// The URI, password and query redacted.
        uri: String,
        /// What went wrong, in words.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A tenant's download would reach a non-public address: loopback, private,
    /// link-local, CGNAT, unique-local, multicast, unspecified, or one of the host's own
    /// (named at the first URL or a redirect; see [`FetchPolicy`]).
    #[error("fetching {uri} refused: {host} resolves to {addr}, {kind}; code artifacts are fetched from public addresses only")]
    Refused {
        /// The URI asked for, password and query redacted.
        uri: String,
        /// The host refused (the first URL's or a redirect's).
        host: String,
        /// The address it resolved to.
        addr: std::net::IpAddr,
        /// What the address is, in words (`a private address`).
        kind: String,
    },
    /// File trouble.
    #[error(transparent)]
    Io(#[from] RootfsError),
}

/// The local file or directory a code artifact location names (`/path`, `./path`,
/// `file:///path`).
pub fn locate(uri: &str) -> Result<PathBuf, ArtifactError> {
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if uri.contains("://") {
        return Err(ArtifactError::Scheme(uri.to_owned()));
    }
    Ok(PathBuf::from(uri))
}

mod extract;
mod fetch;
pub use extract::extract_zip;
pub use fetch::{fetch, fetch_with, FetchPolicy};
// The registry pulls' address rule is the artifact downloads'.
pub(crate) use fetch::{enter_own_namespace, guarded, non_public, Guard, Refusal};
