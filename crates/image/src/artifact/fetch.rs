//! Downloading code artifacts named by http(s) URIs (see the parent module).
//!
//! A tenant's URL must not turn the daemon into a client of the host's own network (its
//! loopback services, a cloud's metadata address, the private network behind it), so a
//! tenant's download ([`FetchPolicy::tenant`]) is held back twice:
//!
//! 1. In the process: host names resolve through [`PublicResolver`], which drops every
//!    non-public address and the host's own, and fails when none is left; IP-literal hosts,
//!    which no resolver sees, are checked at the first URL and at every redirect (a custom
//!    redirect policy). No proxy from the environment: it would resolve names itself.
//! 2. In the kernel, when the process may set up networks (root): the download's sockets
//!    are opened by a thread of its own inside a network namespace with a guest's internet
//!    egress ([`NetNs::create_local`]), so whatever slips past the first layer still meets
//!    the guest firewall: the host, other VMs and the closed ranges stay out of reach. The
//!    namespace's name is removed as soon as the thread is in it: the namespace then lives
//!    exactly as long as the thread, and nothing outlives a crash. Names are still resolved
//!    by the first layer's resolver on the caller's runtime, in the host's namespace.

use super::{locate, ArtifactError, Limits, CONNECT_TIMEOUT, DOWNLOAD_TIMEOUT, MAX_REDIRECTS};
use crate::{io, RootfsError};
use hearth_vmm::net::{self, Egress, NetNs};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;
use reqwest::Url;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Whose download it is, and so what it may reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Reach any address (loopback, private, the host's own) and honour the usual
    /// `HTTPS_PROXY`/`NO_PROXY` variables: the operator's own tools (`hearth images local build`,
    /// run by root). Off, the default, for tenants: public addresses only, no proxy, from
    /// a network namespace of its own when the process is root (see the module).
    pub allow_private: bool,
}

impl FetchPolicy {
    /// A tenant's download (the default): public addresses only.
    pub fn tenant() -> Self {
        FetchPolicy { allow_private: false }
    }

    /// The operator's download: whatever the host reaches.
    pub fn operator() -> Self {
        FetchPolicy { allow_private: true }
    }
}

/// The local file or directory for a code artifact location, downloading it first, for a
/// tenant, when it is an `http://` or `https://` URI: [`fetch_with`] and
/// [`FetchPolicy::tenant`].
///
/// # Errors
///
/// As [`fetch_with`].
///
/// # Example
///
/// ```no_run
/// # async fn example() -> Result<(), hearth_image::artifact::ArtifactError> {
/// let work = tempfile::tempdir().expect("temp dir");
/// let zip = hearth_image::artifact::fetch("https://example.invalid/app.zip", work.path(), Default::default()).await?;
/// assert!(zip.starts_with(work.path()));
/// # Ok(()) }
/// ```
pub async fn fetch(uri: &str, work: &Path, limits: Limits) -> Result<PathBuf, ArtifactError> {
    fetch_with(uri, work, limits, FetchPolicy::tenant()).await
}

/// The local file or directory for a code artifact location, downloading it first when it
/// is an `http://` or `https://` URI, with what `policy` lets the download reach.
///
/// Local paths and `file://` URIs are returned as [`locate`] returns them, without
/// touching `work`. An http(s) body is streamed into a new file inside `work` (a directory
/// that must exist and that the caller owns and removes) whose path is returned; its name
/// says nothing about its content, so callers decide what it is (a zip, usually).
///
/// The download follows at most [`MAX_REDIRECTS`] redirects and gives up after
/// [`CONNECT_TIMEOUT`] without a connection or [`DOWNLOAD_TIMEOUT`] in all. A tenant's
/// reaches public addresses only, at the first URL and every redirect (see the module).
///
/// # Errors
///
/// [`ArtifactError::Scheme`] for other schemes (`s3://`, `ftp://`...),
/// [`ArtifactError::BadUri`], [`ArtifactError::Refused`] when a tenant's URL or one of its
/// redirects leads to a non-public address, [`ArtifactError::Status`] for a non-2xx
/// answer, [`ArtifactError::DownloadTooLarge`] when the body (declared or received)
/// exceeds `limits.max_bytes`, [`ArtifactError::Fetch`] for network trouble and timeouts
/// (and when the download's network namespace cannot be set up: it fails closed),
/// [`ArtifactError::Io`] when the file cannot be written. After an error nothing of the
/// download is left in `work`.
///
/// # Example
///
/// ```no_run
/// # async fn example() -> Result<(), hearth_image::artifact::ArtifactError> {
/// use hearth_image::artifact::{fetch_with, FetchPolicy};
/// let work = tempfile::tempdir().expect("temp dir");
/// // The operator's own tool may fetch from the host's loopback.
/// let zip = fetch_with("http://127.0.0.1:8000/app.zip", work.path(), Default::default(), FetchPolicy::operator()).await?;
/// assert!(zip.starts_with(work.path()));
/// # Ok(()) }
/// ```
pub async fn fetch_with(uri: &str, work: &Path, limits: Limits, policy: FetchPolicy) -> Result<PathBuf, ArtifactError> {
    match uri.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => {
            if policy.allow_private {
                return fetch_http(uri, work, limits, Guard::default(), false).await;
            }
            fetch_http(uri, work, limits, Guard::public_only()?, net::can_network()).await
        }
        _ => locate(uri),
    }
}

/// Which destinations a download (or a tenant's registry pull) may connect to.
#[derive(Debug, Default)]
pub(crate) struct Guard {
    /// Public addresses only (else anything: the operator's downloads).
    public_only: bool,
    /// The host's own addresses, refused whatever their range.
    host: Vec<IpAddr>,
    /// IP-literal destinations let through although not public (tests' loopback servers).
    pub(crate) exempt: Vec<SocketAddr>,
}

impl Guard {
    fn public_only() -> Result<Guard, ArtifactError> {
        Ok(Guard::tenant().map_err(io("list the host's addresses"))?)
    }

    /// Public addresses only, the host's own refused.
    ///
    /// # Errors
    /// When the host's addresses cannot be listed.
    pub(crate) fn tenant() -> std::io::Result<Guard> {
        Ok(Guard { public_only: true, host: net::host_addresses()?, exempt: Vec::new() })
    }

    /// What `addr` is when the download may not reach it.
    fn refuses(&self, addr: IpAddr) -> Option<String> {
        if !self.public_only {
            return None;
        }
        non_public(addr).or_else(|| self.host.contains(&addr).then(|| "an address of this host".to_owned()))
    }

    /// Checks `url`'s host when it is an IP literal (names are checked as they resolve).
    pub(crate) fn check(&self, url: &Url) -> Result<(), Refusal> {
        let host = url.host_str().unwrap_or_default();
        // The URL parser has already turned every IPv4 spelling (`2130706433`, `0x7f.1`)
        // into dotted quads and bracketed IPv6.
        let Ok(addr) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else { return Ok(()) };
        if self.exempt.contains(&SocketAddr::new(addr, url.port_or_known_default().unwrap_or(0))) {
            return Ok(());
        }
        match self.refuses(addr) {
            Some(kind) => Err(Refusal { host: host.to_owned(), addr, kind }),
            None => Ok(()),
        }
    }
}

/// What `addr` is when it is not a public address: loopback, private, link-local, CGNAT,
/// multicast, reserved (the guests' closed ranges), unique-local, unspecified, or an IPv6
/// address carrying one of those in IPv4.
pub(crate) fn non_public(addr: IpAddr) -> Option<String> {
    let v6 = match addr {
        IpAddr::V4(a) => return net::closed_range(a).map(|(_, kind)| format!("a {kind} address")),
        IpAddr::V6(a) => a,
    };
    if v6.is_unspecified() {
        return Some("an unspecified address".into());
    }
    if v6.is_loopback() {
        return Some("a loopback address".into());
    }
    if let Some(v4) = embedded_v4(v6) {
        return non_public(IpAddr::V4(v4));
    }
    let kind = match v6.segments()[0] {
        s if s & 0xfe00 == 0xfc00 => "a unique-local (private) address",
        s if s & 0xffc0 == 0xfe80 => "a link-local address",
        s if s & 0xffc0 == 0xfec0 => "a site-local address",
        s if s & 0xff00 == 0xff00 => "a multicast address",
        _ => return None,
    };
    Some(kind.into())
}

/// The IPv4 address an IPv6 address stands for: IPv4-mapped and -compatible
/// (`::ffff:a.b.c.d`, `::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match a.segments() {
        [0, 0, 0, 0, 0, 0 | 0xffff, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// A destination a download may not reach. Raised inside the HTTP client (resolver,
/// redirect policy), it comes back as the source of the client's error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{host} resolves to {addr}, {kind}")]
pub(crate) struct Refusal {
    pub(crate) host: String,
    pub(crate) addr: IpAddr,
    pub(crate) kind: String,
}

impl Refusal {
    fn into_error(self, uri: &str) -> ArtifactError {
        ArtifactError::Refused { uri: uri.to_owned(), host: self.host, addr: self.addr, kind: self.kind }
    }
}

/// Resolves a download's host names, keeping the addresses the guard lets through and
/// failing with a [`Refusal`] when none is left. With `lookups`, lookups run on that
/// runtime: the caller's, in the host's network namespace, while the download itself runs
/// in a namespace of its own.
struct PublicResolver {
    guard: Arc<Guard>,
    lookups: Option<tokio::runtime::Handle>,
}

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (guard, lookups, host) = (self.guard.clone(), self.lookups.clone(), name.as_str().to_owned());
        Box::pin(async move {
            let lookup = tokio::net::lookup_host((host.clone(), 0));
            let found: Vec<SocketAddr> = match lookups {
                Some(rt) => rt.spawn(async move { lookup.await.map(Iterator::collect::<Vec<_>>) }).await??,
                None => lookup.await?.collect(),
            };
            let mut refused = None;
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match guard.refuses(a.ip()) {
                    Some(kind) => {
                        refused.get_or_insert(Refusal { host: host.clone(), addr: a.ip(), kind });
                        false
                    }
                    None => true,
                })
                .collect();
            match refused {
                Some(r) if kept.is_empty() => Err(Box::new(r) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(kept.into_iter()) as Addrs),
            }
        })
    }
}

/// The HTTP client of one download: timeouts and redirect limits, and for a guarded one the
/// resolver, the redirect check and no proxies.
fn http_client(guard: &Arc<Guard>, lookups: Option<tokio::runtime::Handle>) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).timeout(DOWNLOAD_TIMEOUT);
    if !guard.public_only {
        return builder.redirect(Policy::limited(MAX_REDIRECTS)).build();
    }
    guarded(builder, guard, lookups).build()
}

/// `builder` under `guard`: names resolved through [`PublicResolver`] (on `lookups` when
/// given), every redirect's IP-literal host checked, at most [`MAX_REDIRECTS`], no proxy.
/// A [`Refusal`] comes back as the source of the client's error.
pub(crate) fn guarded(
    builder: reqwest::ClientBuilder,
    guard: &Arc<Guard>,
    lookups: Option<tokio::runtime::Handle>,
) -> reqwest::ClientBuilder {
    let check = guard.clone();
    builder.no_proxy().dns_resolver(Arc::new(PublicResolver { guard: guard.clone(), lookups })).redirect(Policy::custom(move |attempt| {
        match check.check(attempt.url()) {
            Err(r) => attempt.error(r),
            Ok(()) => Policy::limited(MAX_REDIRECTS).redirect(attempt),
        }
    }))
}

/// Moves the calling thread (a thread of its own, never a runtime's worker) into a new
/// network namespace with a guest's internet egress, whose name is removed at once: it
/// lives exactly as long as the thread. `prefix` names it while it is made.
///
/// # Errors
/// What could not be done, and why.
pub(crate) fn enter_own_namespace(prefix: &str) -> Result<(), (&'static str, Box<dyn std::error::Error + Send + Sync>)> {
    let mut rand = [0u8; 6];
    getrandom::fill(&mut rand).map_err(|e| ("name a network namespace", e.to_string().into()))?;
    let id: String = rand.iter().map(|b| format!("{b:02x}")).collect();
    let ns = NetNs::create_local(&format!("{prefix}-{id}"), &Egress::internet())
        .map_err(|e| ("set up a network namespace", Box::new(e) as Box<dyn std::error::Error + Send + Sync>))?;
    let entered = ns.enter();
    drop(ns);
    entered.map_err(|e| ("enter a network namespace", Box::new(e) as Box<dyn std::error::Error + Send + Sync>))
}

/// Downloads `uri` into `work` under `guard`, from a network namespace of its own with
/// `isolate` (see the module).
async fn fetch_http(uri: &str, work: &Path, limits: Limits, guard: Guard, isolate: bool) -> Result<PathBuf, ArtifactError> {
    let shown = redact(uri);
    let url = Url::parse(uri).map_err(|e| ArtifactError::BadUri { uri: shown.clone(), reason: e.to_string() })?;
    guard.check(&url).map_err(|r| r.into_error(&shown))?;
    let guard = Arc::new(guard);
    if !isolate {
        let client = http_client(&guard, None).map_err(|e| fetch_error(&shown, e))?;
        return download(&client, url, &shown, work, limits).await;
    }
    let lookups = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (work, thread_shown) = (work.to_owned(), shown.clone());
    std::thread::Builder::new()
        .name("artifact-fetch".into())
        .spawn(move || {
            let _ = tx.send(isolated(url, &thread_shown, &work, limits, &guard, lookups));
        })
        .map_err(io("start a download thread"))?;
    rx.await
        .unwrap_or_else(|_| Err(ArtifactError::Fetch { uri: shown, what: "the download thread died".into(), source: "it panicked".into() }))
}

/// Runs a download on the calling thread, a thread of its own, from a network namespace
/// of its own with a guest's internet egress: made, entered, its name removed at once (the
/// namespace lives while the thread is in it and goes with it), then a runtime of the
/// thread's own for the download.
fn isolated(
    url: Url,
    shown: &str,
    work: &Path,
    limits: Limits,
    guard: &Arc<Guard>,
    lookups: tokio::runtime::Handle,
) -> Result<PathBuf, ArtifactError> {
    let fail = |what: &str, source: Box<dyn std::error::Error + Send + Sync>| ArtifactError::Fetch {
        uri: shown.to_owned(),
        what: format!("could not {what} for the download (tenants' downloads run in one)"),
        source,
    };
    enter_own_namespace("fetch").map_err(|(what, e)| fail(what, e))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("start the download's runtime"))?;
    rt.block_on(async {
        let client = http_client(guard, Some(lookups)).map_err(|e| fetch_error(shown, e))?;
        download(&client, url, shown, work, limits).await
    })
}

/// `uri` for messages: no user or password, no query (tokens travel in the user name,
/// presigned URLs carry their signature in the query).
fn redact(uri: &str) -> String {
    if let Ok(mut url) = reqwest::Url::parse(uri) {
        let _ = url.set_username("");
        let _ = url.set_password(None);
        if url.query().is_some() {
            url.set_query(Some("..."));
        }
        url.set_fragment(None);
        return url.to_string();
    }
    // Unparseable: the same by hand, roughly.
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let authority_end = rest[..end].find('/').unwrap_or(end);
    let start = rest[..authority_end].rfind('@').map_or(0, |i| i + 1);
    let mut shown = format!("{scheme}://{}", &rest[start..end]);
    if end < rest.len() {
        shown.push_str("?...");
    }
    shown
}

fn fetch_error(uri: &str, e: reqwest::Error) -> ArtifactError {
    // A refusal raised by the resolver or the redirect policy is somewhere in the chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refusal>() {
            return r.clone().into_error(uri);
        }
        cause = c.source();
    }
    let what = if e.is_connect() && e.is_timeout() {
        format!("no connection within {} s", CONNECT_TIMEOUT.as_secs())
    } else if e.is_timeout() {
        format!("the download did not finish within {} s", DOWNLOAD_TIMEOUT.as_secs())
    } else if e.is_redirect() {
        format!("could not follow its redirects (at most {MAX_REDIRECTS}, to http or https only)")
    } else if e.is_connect() {
        "could not connect to the server".to_owned()
    } else if e.is_builder() {
        "the HTTP client could not be set up".to_owned()
    } else {
        "the transfer broke off".to_owned()
    };
    // The client's own message repeats the full URL, secrets included.
    ArtifactError::Fetch { uri: uri.to_owned(), what, source: Box::new(e.without_url()) }
}

/// Downloads `url` (`shown` in messages) into a new file inside `work` (see [`fetch_with`]).
async fn download(client: &reqwest::Client, url: Url, shown: &str, work: &Path, limits: Limits) -> Result<PathBuf, ArtifactError> {
    let mut response = client.get(url).send().await.map_err(|e| fetch_error(shown, e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(ArtifactError::Status { uri: shown.to_owned(), status: status.as_u16() });
    }
    let too_large = || ArtifactError::DownloadTooLarge { uri: shown.to_owned(), limit: limits.max_bytes };
    if response.content_length().is_some_and(|n| n > limits.max_bytes) {
        return Err(too_large());
    }
    let (file, path) = tempfile::Builder::new()
        .prefix("artifact-")
        .tempfile_in(work)
        .map_err(io(format!("create a download file in {}", work.display())))?
        .into_parts();
    // From here every early return drops `path`, which removes the partial file.
    let mut file = tokio::fs::File::from_std(file);
    let what = || format!("write {}", path.display());
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| fetch_error(shown, e))? {
        received += chunk.len() as u64;
        if received > limits.max_bytes {
            return Err(too_large());
        }
        file.write_all(&chunk).await.map_err(io(what()))?;
    }
    // A tokio file finishes its last write in the background until flushed.
    file.flush().await.map_err(io(what()))?;
    drop(file);
    path.keep().map_err(|e| ArtifactError::Io(RootfsError::Io { what: format!("keep {}", e.path.display()), source: e.error }))
}

#[cfg(test)]
mod tests;
