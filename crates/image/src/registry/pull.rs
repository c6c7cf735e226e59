//! One pull: manifest (and index), config, layers, flattening, the digest cache.

use super::http::{Ctx, Registry, CONNECT_TIMEOUT, READ_TIMEOUT};
use super::{quote_remote, Arch, ImageDefaults, PullError, Pulled, Source};
use super::{MAX_CONFIG_BYTES, MAX_IMAGE_BYTES, MAX_INDEX_ENTRIES, MAX_LAYERS, MAX_LAYER_BYTES};
use crate::artifact::Guard;
use crate::oci::{apply_layer, Budget};
use oci_client::manifest::{ImageIndexEntry, OciImageManifest, OciManifest};
use oci_client::Reference;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Free disk a pull leaves at least, beyond what it expects to write.
pub const MIN_FREE_BYTES: u64 = 2 << 30;

/// Layer media types Hearth applies (OCI and Docker; plain, gzip and zstd tars).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// Whether `d` is a `sha256:<64 hex>` digest (the only kind fetched: it goes into URLs).
fn sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Bytes free to unprivileged writers on `dir`'s filesystem (its nearest existing ancestor).
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let dir = std::iter::successors(Some(dir), |p| p.parent()).find(|p| p.is_dir())?;
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses to go on when `dir`'s filesystem has less than `needed` plus [`MIN_FREE_BYTES`]
/// free: a message saying so.
pub(crate) fn check_free(dir: &Path, needed: u64) -> Result<(), String> {
    match free_bytes(dir) {
        Some(free) if free < needed.saturating_add(MIN_FREE_BYTES) => Err(format!(
            "the Hearth host is short of disk ({} MiB free, {} MiB needed and {} MiB kept free); try again later or ask the operator",
            free >> 20,
            needed >> 20,
            MIN_FREE_BYTES >> 20
        )),
        _ => Ok(()),
    }
}

/// The cache files of `digest` in `dir`.
fn cache_paths(dir: &Path, digest: &str) -> Option<(PathBuf, PathBuf)> {
    let (algo, hex) = digest.split_once(':')?;
    if algo != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let stem = format!("{algo}-{}", hex.to_ascii_lowercase());
    Some((dir.join(format!("{stem}.ext4")), dir.join(format!("{stem}.json"))))
}

/// A cached image, when both its files are there.
fn cached(dir: &Path, digest: &str, reference: &str) -> Option<Pulled> {
    let (rootfs, meta) = cache_paths(dir, digest)?;
    let text = std::fs::read(&meta).ok()?;
    let config: ImageDefaults = serde_json::from_slice(&text).ok()?;
    rootfs.is_file().then(|| Pulled { rootfs, digest: digest.to_owned(), reference: reference.to_owned(), config })
}

/// `host[:port]` → whether every address it resolves to is one tenants may reach.
async fn check_public(ctx: &Ctx, host: &str) -> Result<(), PullError> {
    let url = reqwest::Url::parse(&format!("https://{host}/")).map_err(|e| ctx.invalid(format!("registry {host}: {e}")))?;
    let name = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let own = hearth_vmm::net::host_addresses().map_err(ctx.host("list the host's addresses"))?;
    let found = tokio::net::lookup_host((name.as_str(), port)).await.map_err(|e| PullError::Unreachable {
        reference: ctx.reference.clone(),
        registry: ctx.registry.clone(),
        via: ctx.via.clone(),
        detail: format!("cannot resolve {name}: {e}"),
    })?;
    for a in found {
        if crate::artifact::non_public(a.ip()).is_some() || own.contains(&a.ip()) {
            return Err(PullError::Refused { reference: ctx.reference.clone(), target: host.to_owned() });
        }
    }
    Ok(())
}

/// The index entry for `arch` on Linux, or why there is none.
fn pick(ctx: &Ctx, entries: &[ImageIndexEntry], arch: Arch) -> Result<String, PullError> {
    if entries.len() > MAX_INDEX_ENTRIES {
        return Err(ctx.invalid(format!("the index lists {} images; the limit is {MAX_INDEX_ENTRIES}", entries.len())));
    }
    let fits = |e: &&ImageIndexEntry| {
        e.platform.as_ref().is_some_and(|p| {
            p.os == "linux" && p.architecture == arch.oci() && (arch != Arch::Arm64 || p.variant.as_deref().is_none_or(|v| v == "v8"))
        })
    };
    if let Some(e) = entries.iter().find(fits) {
        return Ok(e.digest.clone());
    }
    let mut available: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| format!("{}/{}{}", p.os, p.architecture, p.variant.as_deref().map(|v| format!("/{v}")).unwrap_or_default()))
        .collect();
    available.dedup();
    Err(PullError::NoPlatform {
        reference: ctx.reference.clone(),
        wanted: arch.oci().to_owned(),
        available: if available.is_empty() { "no platform listed".into() } else { quote_remote(&available.join(", ")) },
    })
}

/// The image manifest's limits, checked before anything is downloaded.
fn check_manifest(ctx: &Ctx, m: &OciImageManifest) -> Result<(), PullError> {
    if m.layers.len() > MAX_LAYERS {
        return Err(ctx.invalid(format!("the image has {} layers; the limit is {MAX_LAYERS}", m.layers.len())));
    }
    if !sha256_digest(&m.config.digest) || m.layers.iter().any(|l| !sha256_digest(&l.digest)) {
        return Err(ctx.invalid("the manifest names a blob by something other than a sha256 digest"));
    }
    if !(0..=MAX_CONFIG_BYTES as i64).contains(&m.config.size) {
        return Err(ctx.invalid(format!("the image config declares {} bytes; the limit is {MAX_CONFIG_BYTES}", m.config.size)));
    }
    let mut total = 0u64;
    for l in &m.layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ctx.invalid(format!("a layer has the media type {}, which Hearth does not unpack", quote_remote(&l.media_type))));
        }
        if !(0..=MAX_LAYER_BYTES as i64).contains(&l.size) {
            return Err(ctx.invalid(format!("a layer declares {} bytes; the limit is {MAX_LAYER_BYTES}", l.size)));
        }
        total += l.size as u64;
    }
    if total > MAX_IMAGE_BYTES {
        return Err(ctx.invalid(format!("the layers total {total} bytes; the limit is {MAX_IMAGE_BYTES}")));
    }
    Ok(())
}

/// The parts of the image config a build inherits (and the platform, checked).
fn read_config(ctx: &Ctx, bytes: &[u8], arch: Arch) -> Result<ImageDefaults, PullError> {
    #[derive(serde::Deserialize, Default)]
    struct Inner {
        #[serde(rename = "Env", default)]
        env: Option<Vec<String>>,
        #[serde(rename = "WorkingDir", default)]
        workdir: Option<String>,
        #[serde(rename = "User", default)]
        user: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        architecture: Option<String>,
        #[serde(default)]
        os: Option<String>,
        #[serde(default)]
        config: Option<Inner>,
    }
    let f: File = serde_json::from_slice(bytes).map_err(|e| ctx.invalid(format!("the image config is not valid: {e}")))?;
    let (os, a) = (f.os.unwrap_or_else(|| "linux".into()), f.architecture.unwrap_or_else(|| arch.oci().into()));
    if os != "linux" || a != arch.oci() {
        return Err(PullError::NoPlatform {
            reference: ctx.reference.clone(),
            wanted: arch.oci().into(),
            available: quote_remote(&format!("{os}/{a}")),
        });
    }
    let inner = f.config.unwrap_or_default();
    let env =
        inner.env.unwrap_or_default().into_iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
    Ok(ImageDefaults { env, workdir: inner.workdir.filter(|w| !w.is_empty()), user: inner.user.filter(|u| !u.is_empty()) })
}

/// What a pull hands to its network part.
struct Job {
    reference: Reference,
    ctx: Ctx,
    scheme: &'static str,
    creds: Option<(String, String)>,
    cache: PathBuf,
    arch: Arch,
    /// For a tenant's registry: the guard its connections go through.
    guard: Option<Arc<Guard>>,
}

/// What the network part found: the image in the cache, or its layers downloaded.
enum Fetched {
    Cached(Pulled),
    Layers { digest: String, defaults: ImageDefaults, scratch: tempfile::TempDir, files: Vec<PathBuf>, rootfs: PathBuf, meta: PathBuf },
}

/// Sets its flag when dropped: a pull's future dropped (the build cancelled or timed out)
/// stops the flattening it started on the blocking pool.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Pulls `reference` (as written in FROM) for `src`, flattened into an ext4 root
/// filesystem in the cache, or finds it there. A registry the operator did not configure
/// is reached through the guard and, where the host can set up networks, from a network
/// namespace of its own (see the module). Dropping the future stops the pull, the
/// flattening included.
///
/// # Errors
/// [`PullError`]: each variant's message says what the user or the operator can do.
pub async fn pull(reference: &str, src: &Source, log: &mut (dyn FnMut(&str) + Send)) -> Result<Pulled, PullError> {
    let mut r: Reference = super::parse_reference(reference)?;
    let named = r.whole();
    let mirror = src.config.mirrors.get(r.registry()).cloned();
    if let Some(m) = &mirror {
        r.set_mirror_registry(m.host.clone());
    }
    let host = r.resolve_registry().to_owned();
    let trusted = src.operator || src.config.configured(&host);
    let ctx = Ctx {
        reference: named.clone(),
        registry: host.clone(),
        via: mirror.as_ref().map(|_| format!(" (mirror of {})", r.registry())).unwrap_or_default(),
        trusted,
    };
    if !trusted {
        check_public(&ctx, &host).await?;
    }
    let creds = src.config.credentials.get(&host).map(|c| (c.username.clone(), c.password.clone()));
    // Pulled with credentials: the tenant's own cache; anonymously: everyone's.
    let cache = if creds.is_some() { src.private.clone() } else { src.shared.clone() };
    if let Some(hit) = r.digest().and_then(|d| cached(&cache, d, &named)) {
        log(&format!("FROM {named}: cached as {}", hit.digest));
        return Ok(hit);
    }
    let insecure = src.config.mirrors.values().any(|m| m.insecure && m.host == host);
    let guard = match trusted {
        true => None,
        false => Some(Arc::new(Guard::tenant().map_err(ctx.host("list the host's addresses"))?)),
    };
    let isolate = guard.is_some() && hearth_vmm::net::can_network();
    log(&format!("FROM {named}: pulling from {host}{}", ctx.via));
    let scheme = if insecure { "http" } else { "https" };
    let job = Job { reference: r, ctx, scheme, creds, cache, arch: src.arch, guard };
    let (digest, defaults, scratch, files, rootfs, meta) = match network(job, isolate, log).await? {
        Fetched::Cached(hit) => {
            log(&format!("FROM {named}: cached as {}", hit.digest));
            return Ok(hit);
        }
        Fetched::Layers { digest, defaults, scratch, files, rootfs, meta } => (digest, defaults, scratch, files, rootfs, meta),
    };
    log(&format!("FROM {named}: flattening {} layers into a root filesystem", files.len()));
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let flattened = {
        let (rootfs, meta, defaults, stop) = (rootfs.clone(), meta.clone(), defaults.clone(), stop.0.clone());
        tokio::task::spawn_blocking(move || flatten(scratch, &files, &rootfs, &meta, &defaults, &stop)).await
    };
    let host_err = |e: Box<dyn std::error::Error + Send + Sync>| PullError::Host {
        reference: named.clone(),
        what: "flatten the layers".into(),
        source: e,
    };
    match flattened {
        Ok(Ok(())) => {}
        Ok(Err(crate::RootfsError::Invalid(m))) => return Err(PullError::Invalid { reference: named, reason: m }),
        Ok(Err(e)) => return Err(host_err(Box::new(e))),
        Err(e) => return Err(host_err(Box::new(e))),
    }
    log(&format!("FROM {named}: cached as {digest}"));
    Ok(Pulled { rootfs, digest, reference: named, config: defaults })
}

/// Runs the network part of `job` ([`fetch`]): here, or with `isolate` on a thread of its
/// own inside a network namespace with a guest's internet egress (names still resolved
/// by the guard on this runtime, in the host's namespace). Its log lines come back to
/// `log`; dropping the future ends the isolated thread's work too.
async fn network(job: Job, isolate: bool, log: &mut (dyn FnMut(&str) + Send)) -> Result<Fetched, PullError> {
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, PullError>> + Send>> = if isolate {
        let (done, result) = tokio::sync::oneshot::channel();
        let lookups = tokio::runtime::Handle::current();
        let reference = job.ctx.reference.clone();
        std::thread::Builder::new()
            .name("registry-pull".into())
            .spawn(move || isolated(job, tx, lookups, done))
            .map_err(|e| PullError::Host { reference: reference.clone(), what: "start the pull's thread".into(), source: Box::new(e) })?;
        Box::pin(async move {
            result.await.unwrap_or_else(|_| {
                Err(PullError::Host { reference, what: "pull the image".into(), source: "the pull's thread died".into() })
            })
        })
    } else {
        Box::pin(fetch(job, None, tx))
    };
    tokio::pin!(work);
    loop {
        tokio::select! {
            Some(line) = lines.recv() => log(&line),
            r = &mut work => {
                while let Ok(line) = lines.try_recv() {
                    log(&line);
                }
                return r;
            }
        }
    }
}

/// The isolated thread's body (see [`network`]): enters a namespace of its own (gone with
/// the thread), runs [`fetch`] on a runtime of its own until it ends or nobody waits.
fn isolated(
    job: Job,
    say: tokio::sync::mpsc::UnboundedSender<String>,
    lookups: tokio::runtime::Handle,
    mut done: tokio::sync::oneshot::Sender<Result<Fetched, PullError>>,
) {
    let reference = job.ctx.reference.clone();
    let fail =
        |what: String, source: Box<dyn std::error::Error + Send + Sync>| PullError::Host { reference: reference.clone(), what, source };
    let outcome = (|| {
        crate::artifact::enter_own_namespace("pull")
            .map_err(|(what, e)| fail(format!("{what} for the pull (pulls from tenants' registries run in one)"), e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail("start the pull's runtime".into(), Box::new(e)))?;
        Ok(rt.block_on(async {
            tokio::select! {
                r = fetch(job, Some(lookups), say) => Some(r),
                () = done.closed() => None,
            }
        }))
    })();
    match outcome {
        Ok(Some(r)) => {
            let _ = done.send(r);
        }
        Ok(None) => {}
        Err(e) => {
            let _ = done.send(Err(e));
        }
    }
}

/// `body` as a manifest or an index.
fn parse_manifest(ctx: &Ctx, body: &[u8]) -> Result<OciManifest, PullError> {
    // The position only: serde's message would quote the registry's bytes.
    serde_json::from_slice(body)
        .map_err(|e| ctx.invalid(format!("the registry sent a manifest Hearth cannot read (at line {} column {})", e.line(), e.column())))
}

/// The network part of a pull: the manifest (and index), then, unless the image is
/// cached, its config and layers into a scratch directory in the cache.
async fn fetch(
    job: Job,
    lookups: Option<tokio::runtime::Handle>,
    say: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<Fetched, PullError> {
    let Job { reference: r, ctx, scheme, creds, cache, arch, guard } = job;
    let named = ctx.reference.clone();
    let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).read_timeout(READ_TIMEOUT);
    if let Some(g) = &guard {
        builder = crate::artifact::guarded(builder, g, lookups);
    }
    let client = builder.build().map_err(|e| PullError::Host {
        reference: named.clone(),
        what: "set up the HTTP client".into(),
        source: Box::new(e),
    })?;
    let mut reg = Registry::new(client, scheme, r.resolve_registry(), r.repository(), creds, guard);
    let first = r.digest().or(r.tag()).unwrap_or("latest");
    let (body, d) = reg.manifest(&ctx, first).await?;
    let (manifest, digest) = match parse_manifest(&ctx, &body)? {
        OciManifest::Image(m) => (m, d),
        OciManifest::ImageIndex(index) => {
            let d = pick(&ctx, &index.manifests, arch)?;
            if !sha256_digest(&d) {
                return Err(ctx.invalid("the index names an image by something other than a sha256 digest"));
            }
            let (body, _) = reg.manifest(&ctx, &d).await?;
            match parse_manifest(&ctx, &body)? {
                OciManifest::Image(m) => (m, d),
                OciManifest::ImageIndex(_) => return Err(ctx.invalid("the index names another index, not an image")),
            }
        }
    };
    if let Some(hit) = cached(&cache, &digest, &named) {
        return Ok(Fetched::Cached(hit));
    }
    let (rootfs, meta) =
        cache_paths(&cache, &digest).ok_or_else(|| ctx.invalid(format!("unsupported digest {}", quote_remote(&digest))))?;
    check_manifest(&ctx, &manifest)?;
    let mut config = Vec::new();
    reg.blob(&ctx, &manifest.config.digest, manifest.config.size as u64, &mut config).await?;
    let defaults = read_config(&ctx, &config, arch)?;

    std::fs::create_dir_all(&cache).map_err(ctx.host("create the image cache"))?;
    // The download, then the tree it unpacks to and the ext4 file made of it: four times
    // the compressed size is the estimate checked (the unpacked budget bounds it).
    let total: u64 = manifest.layers.iter().map(|l| l.size as u64).sum();
    check_free(&cache, total.saturating_mul(4)).map_err(|detail| PullError::Disk { reference: named.clone(), detail })?;
    let scratch = tempfile::Builder::new().prefix(".pull-").tempdir_in(&cache).map_err(ctx.host("create a scratch directory"))?;
    let mut files = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let _ = say.send(format!("FROM {named}: layer {}/{} ({} bytes)", i + 1, manifest.layers.len(), layer.size));
        let path = scratch.path().join(format!("layer-{i}"));
        let mut file = tokio::fs::File::create(&path).await.map_err(ctx.host("create a layer file"))?;
        reg.blob(&ctx, &layer.digest, layer.size as u64, &mut file).await?;
        files.push(path);
    }
    Ok(Fetched::Layers { digest, defaults, scratch, files, rootfs, meta })
}

/// Applies `layers` in order onto an empty root, then writes the ext4 file and, last, the
/// metadata that makes the cache entry visible. The scratch directory goes when this ends;
/// `stop` set (the pull was dropped) ends it between layers.
fn flatten(
    scratch: tempfile::TempDir,
    layers: &[PathBuf],
    rootfs: &Path,
    meta: &Path,
    defaults: &ImageDefaults,
    stop: &AtomicBool,
) -> Result<(), crate::RootfsError> {
    let stopped = || crate::RootfsError::Invalid("the pull was stopped".into());
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).map_err(crate::io("create the root"))?;
    let mut budget = Budget::default();
    for l in layers {
        if stop.load(Ordering::SeqCst) {
            return Err(stopped());
        }
        apply_layer(l, &root, &mut budget)?;
        // Each layer's file is removed as soon as it is applied: the disk holds one copy.
        let _ = std::fs::remove_file(l);
    }
    if stop.load(Ordering::SeqCst) {
        return Err(stopped());
    }
    std::fs::create_dir_all(root.join("workspace")).map_err(crate::io("create /workspace"))?;
    crate::ext4::from_dir(&root, rootfs, super::FREE_MIB)?;
    let text = serde_json::to_vec(defaults).map_err(|e| crate::RootfsError::Invalid(e.to_string()))?;
    let tmp = tempfile::NamedTempFile::new_in(scratch.path()).map_err(crate::io("create the cache entry"))?;
    std::fs::write(tmp.path(), text).map_err(crate::io("write the cache entry"))?;
    tmp.persist(meta).map_err(|e| crate::RootfsError::Io { what: "install the cache entry".into(), source: e.error })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx { reference: "docker.io/library/x:1".into(), registry: "r".into(), via: String::new(), trusted: false }
    }

    fn entry(arch: &str, variant: Option<&str>) -> ImageIndexEntry {
        serde_json::from_value(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{arch}"), "size": 1,
            "platform": {"architecture": arch, "os": "linux", "variant": variant}
        }))
        .unwrap()
    }

    #[test]
    fn index_entries_are_picked_by_architecture() {
        let all = [entry("arm64", Some("v8")), entry("amd64", None)];
        assert_eq!(pick(&ctx(), &all, Arch::Amd64).unwrap(), "sha256:amd64");
        assert_eq!(pick(&ctx(), &all, Arch::Arm64).unwrap(), "sha256:arm64");
        let e = pick(&ctx(), &all[..1], Arch::Amd64).unwrap_err().to_string();
        assert!(e.contains("no linux/amd64") && e.contains("linux/arm64/v8"), "{e}");
    }

    #[test]
    fn config_platform_and_defaults() {
        let c = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","LANG=C.UTF-8"],"WorkingDir":"/app"}}"#;
        let d = read_config(&ctx(), c, Arch::Amd64).unwrap();
        assert_eq!(d.env[1], ("LANG".into(), "C.UTF-8".into()));
        assert_eq!(d.workdir.as_deref(), Some("/app"));
        assert!(read_config(&ctx(), c, Arch::Arm64).unwrap_err().to_string().contains("no linux/arm64"));
        assert!(read_config(&ctx(), b"[", Arch::Amd64).is_err());
    }

    #[test]
    fn manifests_over_the_limits_are_refused() {
        let layer = |size: i64, t: &str| serde_json::json!({"mediaType": t, "digest": format!("sha256:{}", "0".repeat(64)), "size": size});
        let m = |layers: Vec<serde_json::Value>| -> OciImageManifest {
            serde_json::from_value(serde_json::json!({"schemaVersion": 2,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "0".repeat(64)), "size": 10},
                "layers": layers}))
            .unwrap()
        };
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        check_manifest(&ctx(), &m(vec![layer(10, gz)])).unwrap();
        assert!(check_manifest(&ctx(), &m(vec![layer(-1, gz)])).is_err());
        assert!(check_manifest(&ctx(), &m(vec![layer(MAX_LAYER_BYTES as i64 + 1, gz)])).is_err());
        assert!(check_manifest(&ctx(), &m(vec![layer(1, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")])).is_err());
        assert!(check_manifest(&ctx(), &m((0..=MAX_LAYERS).map(|_| layer(1, gz)).collect())).is_err());
    }

    /// The second layer alone: with the guard exempting a registry on the host's own
    /// addresses, a pull from its namespace still cannot reach it, and the namespace is
    /// gone afterwards (root only: skipped otherwise).
    #[tokio::test]
    async fn isolated_pulls_cannot_reach_the_host() {
        if !hearth_vmm::net::can_network() {
            eprintln!("skipped: needs root");
            return;
        }
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await;
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
                });
            }
        });
        let cache = tempfile::tempdir().unwrap();
        let mut targets = vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))];
        let own = hearth_vmm::net::host_addresses().unwrap().into_iter().find(|a| a.is_ipv4() && !a.is_loopback());
        targets.extend(own.map(|a| std::net::SocketAddr::new(a, port)));
        for target in targets {
            let job = |ctx_trusted| {
                let mut guard = Guard::tenant().unwrap();
                guard.exempt = vec![target];
                let host = target.to_string();
                Job {
                    reference: super::super::parse_reference(&format!("{host}/r:1")).unwrap(),
                    ctx: Ctx { reference: format!("{host}/r:1"), registry: host, via: String::new(), trusted: ctx_trusted },
                    scheme: "http",
                    creds: None,
                    cache: cache.path().to_path_buf(),
                    arch: Arch::Amd64,
                    guard: Some(Arc::new(guard)),
                }
            };
            let mut log = |_: &str| {};
            // From the host's namespace the exempted registry answers (404: no such image)...
            let e = network(job(false), false, &mut log).await.err().unwrap();
            assert!(matches!(e, PullError::NotFound { .. }), "{target}: {e}");
            // ...from the pull's own it is out of reach.
            let e = network(job(false), true, &mut log).await.err().unwrap();
            assert!(matches!(e, PullError::Unreachable { .. }), "{target}: {e}");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let left = || {
            std::fs::read_dir("/run/netns")
                .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("hearth-pull-")))
                .unwrap_or(false)
        };
        while left() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(!left(), "a pull's network namespace outlived it");
    }

    #[test]
    fn cache_names_come_from_digests_only() {
        let d = Path::new("/c");
        let hex = "ab".repeat(32);
        assert_eq!(cache_paths(d, &format!("sha256:{hex}")).unwrap().0, d.join(format!("sha256-{hex}.ext4")));
        assert!(cache_paths(d, "sha256:../../x").is_none());
        assert!(cache_paths(d, "md5:00").is_none());
    }
}
