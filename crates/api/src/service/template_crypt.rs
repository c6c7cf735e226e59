//! Encryption at rest of an image version's template under the image's
//! `kmsKeyIdentifier`: once a keyed version's build has taken its template, the template's
//! RAM (`memory`) and device state (`state`) are encrypted in place with the key's material
//! ([`crate::at_rest::encrypt_file`], the same crash-safe steps as a suspended microvm's
//! files: `f` → `f.enc.tmp` → `f.enc` → `f` removed), and the key's ARN is recorded beside
//! them ([`SIDECAR`], written first). Only then is the version recorded SUCCESSFUL: a crash
//! at any step leaves it IN_PROGRESS, and the next start's reconcile removes its files and
//! records it FAILED, as for any build a restart cut off.
//!
//! Not encrypted: `manifest.json` (sizes, checksums, the machine) and `disk.qcow2`, the top
//! of the build's layer chain, whose lower layers (the account's layer cache) hold the same
//! data in plain form; encrypting the top alone would hide nothing (docs/SECURITY.md).
//!
//! Launches need plain files (QEMU maps `memory`): the first use of a keyed version
//! ([`Service::template`]: a run, a pool's refill, both through RunMicrovm) decrypts it into
//! a *plain view* in memory-backed storage, never the disk: `/dev/shm/hearth-templates-<hash
//! of the state directory>/<account>.<image>.<version>/` (the root 0700, this user's, and
//! refused unless it is a tmpfs), holding `memory`, `state`, a copy of the manifest, and
//! `disk.qcow2` as a link to the template's disk (a clone's overlay names the disk's real
//! path as its backing file: `qemu::create_overlay` resolves it, so a suspended clone's disk
//! never depends on the view). A view is removed when its version or image is deleted,
//! when the daemon stops (`release_all`) and, left by a crash, when the next one starts.
//! Running clones keep the mapping of a removed view's RAM (the kernel keeps the file while
//! it is mapped).
//!
//! A clone's suspend cannot hard-link the template's RAM from another filesystem, so it
//! keeps all of its RAM in its own state file (`capture::diff_over_base`), encrypted under
//! the microvm's key (by default the image's): resumes never need the view.

use super::Service;
use crate::at_rest::{decrypt_file, sync_dir, AtRestError};
use crate::error::{ApiError, Kind};
use hearth_vmm::Snapshot;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The file of a keyed template that names its key (`{"kmsKeyArn": …}`).
pub(super) const SIDECAR: &str = "encryption.json";

/// Serializes the making and removal of plain views (the first launch of a keyed version
/// decrypts it once; later ones open the view without this lock).
static VIEWS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The template files that hold the guest's data: its state and RAM files, by the names
/// its manifest gives them.
fn template_files(dir: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read(dir.join("manifest.json")).map_err(|e| format!("read the template's manifest: {e}"))?;
    let m: hearth_vmm::snapshot::Manifest = serde_json::from_slice(&text).map_err(|e| format!("the template's manifest: {e}"))?;
    let mut names = vec![m.state.name];
    names.extend(m.memory.map(|r| r.name));
    if names.iter().any(|n| n.is_empty() || n.contains('/') || n.starts_with('.')) {
        return Err(format!("the template's manifest names a bad file: {names:?}"));
    }
    Ok(names)
}

/// Encrypts the template in `dir` under `key` (ARN `arn`): the sidecar first, then each
/// data file ([`super::suspend_crypt::encrypt_names`]); bytes written. Run again, it goes
/// on from wherever a crash stopped it.
pub(super) fn seal_template_dir(key: &[u8; 32], arn: &str, dir: &Path) -> Result<u64, String> {
    let names = template_files(dir)?;
    let tmp = dir.join(format!(".{SIDECAR}.tmp"));
    let body = serde_json::to_vec(&serde_json::json!({ "kmsKeyArn": arn })).expect("a JSON object");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, dir.join(SIDECAR)))
        .map_err(|e| format!("record the template's key: {e}"))?;
    sync_dir(dir);
    super::suspend_crypt::encrypt_names(key, dir, &names, "template.encrypted-one").map_err(|e| e.to_string())
}

/// The key ARN a keyed template in `dir` records; None for a plain template.
fn template_key(dir: &Path) -> Result<Option<String>, String> {
    match std::fs::read(dir.join(SIDECAR)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read {SIDECAR}: {e}")),
        Ok(b) => serde_json::from_slice::<Value>(&b)
            .ok()
            .and_then(|v| v.get("kmsKeyArn")?.as_str().map(str::to_owned))
            .map(Some)
            .ok_or_else(|| format!("{SIDECAR} names no key")),
    }
}

/// The root of this daemon's plain views: in `/dev/shm`, named from its state directory.
pub(super) fn views_root(state: &Path) -> PathBuf {
    use sha2::Digest;
    let canonical = std::fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
    let h = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from("/dev/shm").join(format!("hearth-templates-{hex}"))
}

/// Makes (or checks) the views' root: a directory of this user, mode 0700, not a link,
/// on a tmpfs (the plain RAM never reaches a disk).
fn ensure_root(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("create {}: {e} (keyed images are decrypted into memory-backed /dev/shm)", root.display())),
    }
    let m = std::fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
        return Err(format!("{} is not a private directory of this user; remove it", root.display()));
    }
    let fs = rustix::fs::statfs(root).map_err(|e| format!("statfs {}: {e}", root.display()))?;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    #[allow(clippy::unnecessary_cast)]
    let kind = fs.f_type as i64;
    if kind != TMPFS_MAGIC && kind != RAMFS_MAGIC {
        return Err(format!("{} is not memory-backed (tmpfs); keyed images are never decrypted onto a disk", root.display()));
    }
    Ok(())
}

/// Decrypts the keyed template `template` under `key` into the plain view `view` (made
/// beside it under a temporary name, then renamed: a view either is complete or is not
/// there); the bytes decrypted.
pub(super) fn make_view(key: &[u8; 32], template: &Path, view: &Path) -> Result<u64, String> {
    let root = view.parent().ok_or("a view has a parent")?;
    ensure_root(root)?;
    let tmp = root.join(format!(".tmp-{}", crate::keys::random_hex(8)));
    std::fs::create_dir(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let made = (|| {
        let mut n = 0;
        for f in template_files(template)? {
            n += decrypt_file(key, &f, &super::suspend_crypt::enc(template, &f), &tmp.join(&f)).map_err(|e: AtRestError| e.to_string())?;
        }
        let text = std::fs::read(template.join("manifest.json")).map_err(|e| e.to_string())?;
        let m: hearth_vmm::snapshot::Manifest = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        if let Some(d) = &m.disk {
            let real = std::fs::canonicalize(template.join(d)).map_err(|e| format!("the template's disk: {e}"))?;
            std::os::unix::fs::symlink(real, tmp.join(d)).map_err(|e| e.to_string())?;
        }
        std::fs::write(tmp.join("manifest.json"), text).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, view).map_err(|e| format!("install {}: {e}", view.display()))?;
        Ok(n)
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    made
}

/// Removes the views under `root` whose name starts with `prefix` (all of them for "").
fn remove_views(root: &Path, prefix: &str) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Service {
    fn view_dir(&self, account: &str, name: &str, version: u32) -> PathBuf {
        views_root(&self.state).join(format!("{account}.{name}.{version}"))
    }

    /// After a build of `rec` took its template in `dir`: encrypts it when the version names
    /// a key. An error is the build's failure reason.
    pub(super) async fn seal_template(&self, rec: &crate::store::VersionRecord, dir: &Path) -> Result<(), String> {
        let Some(ident) = rec.spec.get("kmsKeyIdentifier").and_then(Value::as_str) else { return Ok(()) };
        let (arn, key) = self
            .kms_key_material(&rec.account, ident)
            .await
            .map_err(|e| format!("the template could not be encrypted: the image's KMS key is unusable ({})", e.message))?;
        let started = std::time::Instant::now();
        let d = dir.to_path_buf();
        let bytes = super::builds::blocking(move || seal_template_dir(&key, &arn, &d))
            .await
            .map_err(|e| format!("the template could not be encrypted at rest: {e}"))?;
        tracing::info!(image = %rec.name, version = rec.version, bytes, elapsed = ?started.elapsed(), "build: template encrypted at rest");
        self.metrics.observe("template-encrypt", started.elapsed());
        Ok(())
    }

    /// The template microvms of version `version` of image `name` start from: the template
    /// itself, or a keyed one's plain view, decrypted on its first use.
    ///
    /// # Errors
    ///
    /// Conflict when the image's key is gone; internal when the files do not open.
    pub(super) async fn template(&self, account: &str, name: &str, version: u32) -> Result<Snapshot, ApiError> {
        let dir = self.version_dir(account, name, version).join("snapshot");
        let Some(arn) = template_key(&dir).map_err(ApiError::internal)? else {
            return Snapshot::open(&dir).map_err(ApiError::internal);
        };
        let view = self.view_dir(account, name, version);
        // The root is checked before anything in it is trusted: this user's own, 0700, not a
        // link, on tmpfs. /dev/shm is sticky, so once that holds no other user can put or
        // rename anything beneath it (a view planted by another user is never opened).
        ensure_root(&views_root(&self.state))
            .map_err(|e| ApiError::internal(format!("keyed images cannot be decrypted on this host: {e}")))?;
        if let Ok(s) = Snapshot::open(&view) {
            return Ok(s);
        }
        let _held = VIEWS.lock().await;
        if let Ok(s) = Snapshot::open(&view) {
            return Ok(s);
        }
        let key = match self.kms_key_material(account, &arn).await {
            Ok((_, k)) => k,
            Err(e) if e.kind == Kind::NotFound => {
                return Err(ApiError::conflict(
                    "MicrovmImageVersion",
                    &version.to_string(),
                    format!("version {version} of {name} is encrypted under KMS key {arn}, which no longer exists"),
                ))
            }
            Err(e) => return Err(e),
        };
        // Room in memory first: a full /dev/shm is the host's capacity, not a fault.
        let need: u64 = template_files(&dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|f| std::fs::metadata(super::suspend_crypt::enc(&dir, f)).ok())
            .map(|m| m.len())
            .sum();
        let free = crate::capacity::disk_free(&views_root(&self.state));
        if free < need {
            return Err(ApiError::capacity(format!(
                "this host has no room in memory (/dev/shm: {} MiB free) to decrypt version {version} of {name} ({} MiB); \
                 try again after other keyed images' microvms are gone, or ask the operator to grow /dev/shm",
                free >> 20,
                need.div_ceil(1 << 20)
            )));
        }
        let started = std::time::Instant::now();
        let (t, v) = (dir.clone(), view.clone());
        let _ = std::fs::remove_dir_all(&view);
        let bytes = super::builds::blocking(move || make_view(&key, &t, &v)).await.map_err(|e| {
            if e.contains("No space left") {
                ApiError::capacity(format!(
                    "this host ran out of memory (/dev/shm) decrypting version {version} of {name}; try again later"
                ))
            } else {
                ApiError::internal(format!("version {version} of {name}: its encrypted template does not open: {e}"))
            }
        })?;
        tracing::info!(image = %name, version, bytes, elapsed = ?started.elapsed(), view = %view.display(), "template decrypted into memory");
        self.metrics.observe("template-decrypt", started.elapsed());
        Snapshot::open(&view).map_err(ApiError::internal)
    }

    /// Removes the plain views of image `name` (one version, or all of them).
    pub(super) async fn drop_template_views(&self, account: &str, name: &str, version: Option<u32>) {
        let _held = VIEWS.lock().await;
        let root = views_root(&self.state);
        match version {
            Some(v) => {
                let _ = std::fs::remove_dir_all(self.view_dir(account, name, v));
            }
            None => remove_views(&root, &format!("{account}.{name}.")),
        }
        // The root stays while the daemon runs (removed at its stop and start): removing
        // it would let another user take its name meanwhile.
    }

    /// Removes every plain view of this daemon (its start: those a crash left; its stop).
    pub fn drop_all_template_views(&self) {
        let root = views_root(&self.state);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        // Only this user's directory (never one another user put there, nor a link).
        match std::fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == me => {
                remove_views(&root, "");
                let _ = std::fs::remove_dir(&root);
            }
            Ok(_) => tracing::error!(
                root = %root.display(),
                "another user's file or directory holds the name of this daemon's plain views of keyed images: \
                 they will not be made (launches of keyed images fail) until it is removed"
            ),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::suspend_crypt::enc;
    use super::*;
    use crate::at_rest::encrypt_file;

    /// A private directory in /dev/shm, where the host has one.
    fn shm_root() -> Option<tempfile::TempDir> {
        let root = tempfile::Builder::new().prefix("hearth-test-views-").tempdir_in("/dev/shm").ok()?;
        std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        Some(root)
    }

    fn template(dir: &Path) {
        let m = serde_json::json!({
            "magic": "hearth-snapshot", "format_version": 1, "kind": "template", "created_unix_ms": 0,
            "memory_mib": 1, "vcpus": 1, "accel": "tcg", "kernel": "/k", "initramfs": "/i", "qemu_version": "q",
            "state": {"name": "state", "size": 0, "crc32": "0"}, "memory": {"name": "memory", "size": 0, "crc32": "0"},
            "disk": "disk.qcow2", "hostname": "h",
        });
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        std::fs::write(dir.join("state"), b"devices-MARKER").unwrap();
        std::fs::write(dir.join("memory"), b"ram-MARKER").unwrap();
        std::fs::write(dir.join("disk.qcow2"), b"disk").unwrap();
    }

    /// Every crash point of the sealing goes on to one complete, encrypted template, and
    /// its view decrypts to the original files.
    #[test]
    fn every_crash_point_of_sealing_a_template_settles_encrypted() {
        let k = [3u8; 32];
        let names = ["state".to_owned(), "memory".to_owned()];
        // Crash points: after `state.enc.tmp` is written; after it became `state.enc` (plain
        // still there); after `state` went (memory not begun).
        for point in 0..3 {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path();
            template(dir);
            let tmp = dir.join("state.enc.tmp");
            encrypt_file(&k, "state", &dir.join("state"), &tmp).unwrap();
            if point >= 1 {
                std::fs::rename(&tmp, enc(dir, "state")).unwrap();
            }
            if point >= 2 {
                std::fs::remove_file(dir.join("state")).unwrap();
            }
            seal_template_dir(&k, "arn:k", dir).unwrap();
            for n in &names {
                assert!(!dir.join(n).exists() && enc(dir, n).exists(), "point {point}: {n}");
            }
            assert!(!dir.join("state.enc.tmp").exists());
            assert_eq!(template_key(dir).unwrap().as_deref(), Some("arn:k"));
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let body = std::fs::read(e.path()).unwrap();
                assert!(!body.windows(6).any(|w| w == b"MARKER"), "point {point}: {:?} is plain", e.file_name());
            }
            // The plain view: complete, the disk a link to the template's.
            let Some(views) = shm_root() else { continue };
            let view = views.path().join("acct.img.1");
            make_view(&k, dir, &view).unwrap();
            assert_eq!(std::fs::read(view.join("memory")).unwrap(), b"ram-MARKER");
            assert_eq!(std::fs::read(view.join("state")).unwrap(), b"devices-MARKER");
            assert!(std::fs::symlink_metadata(view.join("disk.qcow2")).unwrap().file_type().is_symlink());
            assert_eq!(std::fs::read(view.join("disk.qcow2")).unwrap(), b"disk");
        }
    }

    #[test]
    fn views_are_made_only_in_memory_and_another_key_is_refused() {
        let k = [3u8; 32];
        let d = tempfile::tempdir().unwrap();
        template(d.path());
        seal_template_dir(&k, "arn:k", d.path()).unwrap();
        // A directory on a disk is refused as the views' root.
        let on_disk = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")).unwrap();
        std::fs::set_permissions(on_disk.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let e = make_view(&k, d.path(), &on_disk.path().join("a.b.1")).unwrap_err();
        assert!(e.contains("not memory-backed"), "{e}");
        let Some(root) = shm_root() else { return };
        // A root another could enter, or a link to one, is refused too.
        let open_root = root.path().join("open");
        std::fs::create_dir(&open_root).unwrap();
        std::fs::set_permissions(&open_root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = make_view(&k, d.path(), &open_root.join("a.b.1")).unwrap_err();
        assert!(e.contains("not a private directory"), "{e}");
        let link = root.path().join("link");
        std::os::unix::fs::symlink(on_disk.path(), &link).unwrap();
        let e = make_view(&k, d.path(), &link.join("a.b.1")).unwrap_err();
        assert!(e.contains("not a private directory"), "{e}");
        // A private root of another user (one planted before the daemon made its own) is
        // refused: nothing in it is trusted.
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = ensure_root(&theirs).unwrap_err();
            assert!(e.contains("not a private directory of this user"), "{e}");
        }
        std::fs::remove_dir(&theirs).unwrap();
        std::fs::remove_dir(&open_root).unwrap();
        std::fs::remove_file(&link).unwrap();
        let e = make_view(&[4u8; 32], d.path(), &root.path().join("a.b.1")).unwrap_err();
        assert!(e.contains("not authentic") || e.contains("decrypt"), "{e}");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "nothing partial stays");
        make_view(&k, d.path(), &root.path().join("a.b.1")).unwrap();
        assert_eq!(std::fs::read(root.path().join("a.b.1/memory")).unwrap(), b"ram-MARKER");
        remove_views(root.path(), "a.b.");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }
}
