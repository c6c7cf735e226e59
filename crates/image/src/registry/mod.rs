//! Images pulled from OCI registries for a Dockerfile's `FROM <reference>`.
//!
//! A reference (`python:3.12-slim`, `ghcr.io/o/app@sha256:…`, `host:5000/x/y:tag`) is
//! parsed and normalised by `oci-client` (`python` is `docker.io/library/python:latest`).
//! The pull ([`pull`]) fetches the manifest, picks the requested architecture from a
//! multi-platform index, streams each layer to a scratch file (its size bounded, its digest
//! checked by `oci-client`), applies the layers with [`crate::oci::apply_layer`] (the same
//! path as imported archives: whiteouts, a byte and entry [`crate::oci::Budget`], nothing
//! removed through a link) and makes the tree an ext4 root filesystem. Hearth's agent is
//! not written into it: it is `/init` of the initramfs and switches root into the disk.
//!
//! **Cache**: the root filesystem is kept by the digest of the platform manifest it came
//! from (`<cache>/sha256-<hex>.ext4` and its `.json`), so a rebuild, or another image on
//! the same base, pulls nothing but the manifest. An image pulled anonymously is public:
//! its cache is shared by every tenant ([`Source::shared`]). One pulled with credentials
//! the operator configured is kept in the tenant's own cache ([`Source::private`]): a
//! tenant must not get a private image because another one pulled it.
//!
//! **Configuration** ([`RegistryConfig`]): the operator's `registries.json` (in the API's
//! state directory, or `$HEARTH_HOME` for local builds) and `hearth serve
//! --registry-mirror`: mirrors (`docker.io` → `http://127.0.0.1:5000`) and credentials
//! per registry host.
//!
//! **Which addresses**: registries the operator configured (mirror targets, hosts with
//! credentials) may be anywhere, loopback included. Any other registry a tenant names must
//! resolve to public addresses only, checked before the pull, and the pull itself holds to
//! the artifact download's two layers (`artifact/fetch.rs`) for every connection it opens
//! (the registry, its redirects, the token service it names): names resolved to public
//! addresses only, redirects checked, no proxy from the environment; and, where the
//! daemon can set up networks (root), the connections opened by a thread of its own inside
//! a network namespace with a guest's internet egress, so the kernel drops what reaches
//! the host, loopback, private or link-local ranges whatever a name resolves to later.
//! The HTTP side is Hearth's own (`registry/http.rs`): every reply read with a cap, blobs
//! streamed to files with their digests checked; reply bodies of registries the operator
//! did not configure are never quoted in errors.
//!
//! **Disk**: a pull checks the cache's filesystem for four times the image's compressed
//! size plus [`MIN_FREE_BYTES`] before it downloads. The shared cache is not evicted: a
//! pulled root filesystem is the base (qcow2 backing file) of the layers and images built
//! on it, so it lives as long as they may; it grows by one entry per distinct image
//! tenants pull (see docs/SECURITY.md).
//!
//! `oci-client` 0.15 (its reference parser and manifest types only) is used, not the newest: it is the last release on `reqwest` 0.12 and
//! `sha2` 0.10, which Hearth already uses (one HTTP and TLS stack, rustls with ring), and
//! it passes `cargo deny` (Apache-2.0, crates.io only).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod http;
mod pull;
pub use http::{MAX_ERROR_BYTES, MAX_MANIFEST_BYTES, MAX_TOKEN_BYTES};
pub(crate) use pull::check_free;
pub use pull::{pull, MIN_FREE_BYTES};

/// Longest reference accepted in FROM.
pub const MAX_REFERENCE_LEN: usize = 512;
/// Most bytes of an image's config blob.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most bytes of one (compressed) layer.
pub const MAX_LAYER_BYTES: u64 = 8 << 30;
/// Most bytes of all of an image's (compressed) layers.
pub const MAX_IMAGE_BYTES: u64 = 16 << 30;
/// Most layers of an image.
pub const MAX_LAYERS: usize = 128;
/// Most entries of a multi-platform index.
pub const MAX_INDEX_ENTRIES: usize = 256;
/// Free room given to a pulled root filesystem, in MiB (builds write into an overlay).
pub const FREE_MIB: u64 = 1024;
/// Name of the operator's configuration file.
pub const CONFIG_FILE: &str = "registries.json";

/// A mirror: where a registry's images are pulled from instead.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mirror {
    /// `host[:port]` of the mirror.
    pub host: String,
    /// Spoken over plain HTTP (a mirror on the host's loopback or a trusted network).
    pub insecure: bool,
}

impl Mirror {
    /// Parses `http://host:port` or `https://host[:port]` (a bare host means https).
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(url: &str) -> Result<Mirror, String> {
        let (insecure, rest) = match url.split_once("://") {
            Some(("http", r)) => (true, r),
            Some(("https", r)) => (false, r),
            Some((s, _)) => return Err(format!("mirror {url:?}: use http:// or https://, not {s}://")),
            None => (false, url),
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') || host.contains('@') || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("mirror {url:?}: give a scheme and a host[:port], e.g. http://127.0.0.1:5000"));
        }
        Ok(Mirror { host: host.to_owned(), insecure })
    }
}

/// A user name and password for a registry (HTTP basic, or exchanged for a bearer token).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: <hidden> }}", self.username)
    }
}

/// The operator's registry settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Registry name as references spell it (`docker.io`, `ghcr.io`, `host:5000`) → mirror.
    pub mirrors: BTreeMap<String, Mirror>,
    /// Registry host as contacted (the mirror's, when there is one) → credentials.
    pub credentials: BTreeMap<String, Credentials>,
}

/// `registries.json`, as written by the operator.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    mirrors: BTreeMap<String, String>,
    #[serde(default)]
    credentials: BTreeMap<String, Credentials>,
}

/// Mirrors given on the command line (`hearth serve --registry-mirror`), for every build.
static FLAG_MIRRORS: Mutex<BTreeMap<String, Mirror>> = Mutex::new(BTreeMap::new());

/// Sets the mirrors given by `hearth serve --registry-mirror REGISTRY=URL` (they win over
/// the file's).
///
/// # Errors
/// A message naming the malformed flag.
pub fn set_flag_mirrors(flags: &[String]) -> Result<(), String> {
    let mut out = BTreeMap::new();
    for f in flags {
        let (reg, url) =
            f.split_once('=').ok_or_else(|| format!("--registry-mirror {f:?}: give REGISTRY=URL, e.g. docker.io=http://127.0.0.1:5000"))?;
        out.insert(reg.trim().to_ascii_lowercase(), Mirror::parse(url.trim())?);
    }
    *FLAG_MIRRORS.lock().unwrap_or_else(|e| e.into_inner()) = out;
    Ok(())
}

impl RegistryConfig {
    /// `dir/registries.json` (absent: no settings) with the command line's mirrors on top.
    ///
    /// # Errors
    /// A message naming the file and what is wrong in it.
    pub fn load(dir: &Path) -> Result<RegistryConfig, String> {
        let path = dir.join(CONFIG_FILE);
        let mut cfg = match std::fs::read(&path) {
            Ok(bytes) if bytes.len() > 1 << 20 => return Err(format!("{} is over 1 MiB", path.display())),
            Ok(bytes) => {
                let f: ConfigFile = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut mirrors = BTreeMap::new();
                for (reg, url) in f.mirrors {
                    mirrors.insert(reg.to_ascii_lowercase(), Mirror::parse(&url).map_err(|e| format!("{}: {e}", path.display()))?);
                }
                RegistryConfig { mirrors, credentials: f.credentials }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryConfig::default(),
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        };
        cfg.mirrors.extend(FLAG_MIRRORS.lock().unwrap_or_else(|e| e.into_inner()).clone());
        Ok(cfg)
    }

    /// Whether the operator named `host` (a mirror's host, or one with credentials): such a
    /// registry may be on a private address.
    pub fn configured(&self, host: &str) -> bool {
        self.credentials.contains_key(host) || self.mirrors.values().any(|m| m.host == host)
    }
}

/// The architecture a pull picks from a multi-platform index, as OCI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64.
    Amd64,
    /// 64-bit ARM.
    Arm64,
}

impl Arch {
    /// The host's (guests run the host's architecture).
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    /// The OCI name (`amd64`, `arm64`).
    pub fn oci(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl From<hearth_vmm::Arch> for Arch {
    fn from(a: hearth_vmm::Arch) -> Arch {
        match a {
            hearth_vmm::Arch::X86_64 => Arch::Amd64,
            hearth_vmm::Arch::Aarch64 => Arch::Arm64,
        }
    }
}

/// Where a build pulls from and caches into: whose pull it is.
#[derive(Debug, Clone)]
pub struct Source {
    /// The operator's settings.
    pub config: Arc<RegistryConfig>,
    /// The cache of images pulled anonymously, shared by every tenant.
    pub shared: PathBuf,
    /// The cache of images pulled with credentials: this tenant's own.
    pub private: PathBuf,
    /// The architecture to pull.
    pub arch: Arch,
    /// The operator's own build (`hearth images local build`): any registry address.
    pub operator: bool,
}

/// A pulled image, flattened and cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The ext4 root filesystem.
    pub rootfs: PathBuf,
    /// The platform manifest's digest (`sha256:…`).
    pub digest: String,
    /// The reference as normalised (`docker.io/library/python:3.12-slim`).
    pub reference: String,
    /// What the image's config says.
    pub config: ImageDefaults,
}

/// The parts of an image's config a build inherits: environment, working directory and
/// user. (Its ENTRYPOINT and CMD are not the app: base images' commands are shells and
/// interpreters, and an image with no CMD of its own is saved without an app.)
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageDefaults {
    /// `KEY=value` pairs, split.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User.
    pub user: Option<String>,
}

/// Why a pull failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Not a reference.
    #[error("FROM {reference}: not an image reference ({reason})")]
    BadReference {
        /// As written.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The registry has no such image.
    #[error("FROM {reference}: {registry} has no such image ({detail}); check the name and the tag or digest")]
    NotFound {
        /// Normalised.
        reference: String,
        /// Who answered.
        registry: String,
        /// What it said.
        detail: String,
    },
    /// The registry wants credentials, or refused the ones configured.
    #[error("FROM {reference}: {registry} refused access ({detail}); the operator can set credentials for {registry} in {CONFIG_FILE}")]
    Unauthorized {
        /// Normalised.
        reference: String,
        /// Who refused.
        registry: String,
        /// What it said.
        detail: String,
    },
    /// The registry could not be reached.
    #[error("FROM {reference}: cannot reach the registry {registry}{via} ({detail}); check that it is up and reachable from the Hearth host, or configure a mirror")]
    Unreachable {
        /// Normalised.
        reference: String,
        /// The host contacted.
        registry: String,
        /// ` (mirror of docker.io)` when a mirror.
        via: String,
        /// The cause.
        detail: String,
    },
    /// The index has no image for the architecture.
    #[error(
        "FROM {reference}: the image has no linux/{wanted} variant (it has: {available}); pick an image or tag built for linux/{wanted}"
    )]
    NoPlatform {
        /// Normalised.
        reference: String,
        /// What was asked for.
        wanted: String,
        /// What the index lists.
        available: String,
    },
    /// A tenant's registry, or a server it sent the pull to (a redirect, its token
    /// service), is at an address tenants may not reach. The address is not named: the
    /// host's view of a name is not the tenant's to learn.
    #[error("FROM {reference}: {target} resolves to a non-public address (loopback, private, link-local or the host's own); tenants may pull only from public registries or those the operator configured")]
    Refused {
        /// Normalised.
        reference: String,
        /// The host refused (the registry, or where it redirected).
        target: String,
    },
    /// The host has too little free disk for the pull.
    #[error("FROM {reference}: {detail}")]
    Disk {
        /// Normalised.
        reference: String,
        /// How much is free and needed.
        detail: String,
    },
    /// The image is over a limit, or malformed.
    #[error("FROM {reference}: {reason}")]
    Invalid {
        /// Normalised.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The host failed to store or flatten it.
    #[error("FROM {reference}: {what}: {source}")]
    Host {
        /// Normalised.
        reference: String,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Text a registry sent, made safe to quote: one line, printable, at most 200 characters.
pub(crate) fn quote_remote(s: &str) -> String {
    let clean: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let clean = clean.split_whitespace().collect::<Vec<_>>().join(" ");
    match clean.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &clean[..i]),
        None => clean,
    }
}

/// Parses `reference` as written in FROM.
///
/// # Errors
/// [`PullError::BadReference`].
pub fn parse_reference(reference: &str) -> Result<oci_client::Reference, PullError> {
    let bad = |reason: String| PullError::BadReference { reference: quote_remote(reference), reason };
    if reference.len() > MAX_REFERENCE_LEN {
        return Err(bad(format!("over {MAX_REFERENCE_LEN} characters")));
    }
    oci_client::Reference::try_from(reference)
        .map_err(|e| bad(format!("{e}: write [REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST], the repository in lower case")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_as_docker_does() {
        let r = parse_reference("python:3.12-slim").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("docker.io", "library/python", Some("3.12-slim")));
        let r = parse_reference("127.0.0.1:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert!(r.digest().is_some());
        for bad in ["", "Python:3", "a b", "x@sha256:zz", &"a".repeat(600)] {
            assert!(matches!(parse_reference(bad), Err(PullError::BadReference { .. })), "{bad}");
        }
    }

    #[test]
    fn mirrors_and_config() {
        assert_eq!(Mirror::parse("http://127.0.0.1:5000/").unwrap(), Mirror { host: "127.0.0.1:5000".into(), insecure: true });
        assert_eq!(Mirror::parse("mirror.internal").unwrap(), Mirror { host: "mirror.internal".into(), insecure: false });
        assert!(Mirror::parse("ftp://x").is_err());
        assert!(Mirror::parse("http://u:p@x/").is_err());
        let d = tempfile::tempdir().unwrap();
        assert_eq!(RegistryConfig::load(d.path()).unwrap(), RegistryConfig::default());
        std::fs::write(
            d.path().join(CONFIG_FILE),
            br#"{"mirrors":{"Docker.io":"http://127.0.0.1:5000"},"credentials":{"127.0.0.1:5000":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let c = RegistryConfig::load(d.path()).unwrap();
        assert_eq!(c.mirrors["docker.io"].host, "127.0.0.1:5000");
        assert!(c.configured("127.0.0.1:5000") && !c.configured("ghcr.io"));
        assert!(!format!("{:?}", c.credentials).contains("\"p\""));
        std::fs::write(d.path().join(CONFIG_FILE), br#"{"mirror":{}}"#).unwrap();
        assert!(RegistryConfig::load(d.path()).unwrap_err().contains("unknown field"));
    }

    #[test]
    fn remote_text_is_quoted_safely() {
        assert_eq!(quote_remote("a\n\x1b[31mb  c"), "a [31mb c");
        assert_eq!(quote_remote(&"x".repeat(500)).chars().count(), 201);
    }
}
