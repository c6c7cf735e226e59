//! Code artifacts as a tenant may name them, and what its builds may build on.
//!
//! A tenant reaches no host path it was not given:
//! - `hearth://artifacts/<sha256>`: one of its own uploads ([`crate::upload`]);
//! - `file://` (or a bare absolute path): only beneath the directory the operator allows
//!   the account (`hearth accounts set ACCOUNT --artifact-root DIR`; none by default),
//!   opened beneath it without following any link, a regular file or a directory. Every
//!   refusal reads the same, so a tenant learns nothing about which host paths exist;
//! - `http(s)://`: downloaded by the build from public addresses only
//!   ([`hearth_image::artifact::fetch`] with the tenant policy).
//!
//! The artifact is opened when CreateMicrovmImage is called (so a bad one is a 400 there)
//! and again when its build starts; the build reads it through the descriptor it opened
//! (`/proc/self/fd/N`), so nothing swapped in between is ever read.
//!
//! `FROM hearth/NAME[:vN]` in an API build resolves only the tenant's own images
//! ([`TenantImages`]), and each tenant's layer cache is its own directory.

use super::Service;
use crate::error::ApiError;
use hearth_image::beneath;
use hearth_image::build::{FromImage, ImageResolver};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// A code artifact on this host, held open.
#[derive(Debug)]
pub(crate) struct Local {
    fd: OwnedFd,
    /// A directory (the build context itself) rather than a zip.
    pub dir: bool,
}

impl Local {
    /// A path that names exactly what was opened, while `self` lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Where a build's code comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// On this host, opened.
    Local(Local),
    /// To download (`http://` or `https://`).
    Remote(String),
}

/// The one answer for every `file://` artifact the account may not use, whatever the
/// reason (no root configured, outside it, missing, a link, a device): it says nothing
/// about the host's files.
fn unavailable(uri: &str) -> ApiError {
    ApiError::validation(format!(
        "codeArtifact.uri {uri:?} is not available to this account: a file:// artifact must be a regular file or directory \
         beneath the directory the operator allows the account (`hearth accounts set ACCOUNT --artifact-root DIR`); \
         otherwise upload the zip (`hearth images create NAME ./dir` does, or POST /hearth/v1/artifacts) and name the \
         {}… URI the upload returns",
        crate::upload::URI_PREFIX
    ))
}

/// `path` relative to `root`, with no `..`: lexical only, the opening below is what
/// resolves it (beneath the root, refusing links).
fn under(root: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(root).ok()?;
    rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)).then(|| rel.to_path_buf())
}

impl Service {
    /// Opens the code artifact `uri` names for `account` (see the module docs).
    ///
    /// # Errors
    /// A ValidationException saying what the account may name instead.
    pub(crate) async fn code_artifact(&self, account: &str, uri: &str) -> Result<Source, ApiError> {
        let scheme = uri.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if uri.starts_with(crate::upload::URI_PREFIX) {
            let file = crate::upload::resolve(self, account, uri)
                .and_then(|p| std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(p).ok())
                .ok_or_else(|| {
                    ApiError::validation(format!(
                        "codeArtifact.uri {uri:?} names no upload of this account (uploads are kept {} hours): upload the zip again",
                        crate::upload::UPLOAD_TTL.as_secs() / 3600
                    ))
                })?;
            return Ok(Source::Local(Local { fd: file.into(), dir: false }));
        }
        match scheme.as_deref() {
            Some("http" | "https") => return Ok(Source::Remote(uri.to_owned())),
            Some("file") | None if uri.starts_with("file://") || uri.starts_with('/') => {}
            _ => {
                return Err(ApiError::validation(format!(
                    "codeArtifact.uri {uri:?}: Hearth builds from uploads ({}…), http:// and https:// zips, and file:// paths the operator allows (no S3)",
                    crate::upload::URI_PREFIX
                )))
            }
        }
        let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
        let settings = self.store.account_settings(account).await.map_err(ApiError::internal)?;
        let root = settings.artifact_root.ok_or_else(|| unavailable(uri))?;
        let rel = under(&root, path).ok_or_else(|| unavailable(uri))?;
        let dir = beneath::Dir::open(&root).map_err(|_| unavailable(uri))?;
        let meta = dir.metadata(&rel).map_err(|_| unavailable(uri))?;
        let local = match meta.kind {
            beneath::Kind::Dir => Local { fd: dir.open_dir(&rel).map_err(|_| unavailable(uri))?.into(), dir: true },
            beneath::Kind::File => Local { fd: dir.open_file(&rel).map_err(|_| unavailable(uri))?.into(), dir: false },
            _ => return Err(unavailable(uri)),
        };
        Ok(Source::Local(local))
    }

    /// The layer cache of `account`'s builds.
    pub(crate) fn layer_cache(&self, account: &str) -> hearth_image::layers::LayerCache {
        hearth_image::layers::LayerCache::at(self.state.join("layers").join(account))
    }
}

/// `FROM hearth/NAME[:vN]` for an API build: the account's own successful image versions,
/// nothing else (not another tenant's, not the operator's `hearth images local` store). Read
/// when the build starts: the resolver is called synchronously from inside the build, and
/// the store is async.
pub(crate) struct TenantImages {
    /// The service.
    svc: Arc<Service>,
    /// Whose images.
    account: String,
    /// The account's successfully built versions, by image name, oldest first.
    built: std::collections::HashMap<String, Vec<crate::store::VersionRecord>>,
}

impl TenantImages {
    /// The built versions of `account`'s images, as the store has them now.
    pub(crate) async fn load(svc: Arc<Service>, account: &str) -> Result<Self, ApiError> {
        let mut built = std::collections::HashMap::new();
        for image in svc.store.images(account).await? {
            let versions: Vec<_> = svc
                .store
                .versions(account, &image.name)
                .await?
                .into_iter()
                .filter(|v| v.state == crate::lifecycle::MicrovmImageVersionState::Successful)
                .collect();
            built.insert(image.name, versions);
        }
        Ok(TenantImages { svc, account: account.to_owned(), built })
    }
}

impl ImageResolver for TenantImages {
    fn resolve(&self, r: &str) -> Result<FromImage, String> {
        let missing = || format!("this account has no successfully built image {r}");
        // One reference rule with the local store's: NAME or NAME:vN, the name checked whole.
        let reference: hearth_proto::image::ImageRef = r.parse().map_err(|_| missing())?;
        let (name, version) = (reference.name.as_str(), reference.version);
        let versions = self.built.get(name).map_or(&[][..], Vec::as_slice);
        let v = versions.iter().rev().find(|v| version.is_none_or(|n| v.version == n)).ok_or_else(missing)?;
        Ok(FromImage {
            disk: self.svc.version_dir(&self.account, name, v.version).join("snapshot").join("disk.qcow2"),
            label: format!("hearth/{name}:v{}", v.version),
            config: v.config.clone(),
        })
    }

    /// `FROM <OCI reference>` for an API build: the operator's `<state>/registries.json`
    /// and `hearth serve --registry-mirror`; images pulled anonymously are cached for every
    /// tenant (`<state>/oci/shared/`), those pulled with credentials only for this account
    /// (`<state>/oci/accounts/<account>/`); registries the operator did not configure must
    /// be on public addresses.
    fn registry(&self) -> Result<hearth_image::registry::Source, String> {
        let config = hearth_image::registry::RegistryConfig::load(&self.svc.state)
            .map_err(|e| format!("the operator's registry settings are unusable ({e})"))?;
        let oci = self.svc.state.join("oci");
        Ok(hearth_image::registry::Source {
            config: Arc::new(config),
            shared: oci.join("shared"),
            private: oci.join("accounts").join(&self.account),
            arch: hearth_image::registry::Arch::host(),
            operator: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_root_only() {
        let root = Path::new("/srv/a");
        assert_eq!(under(root, Path::new("/srv/a/x/app.zip")), Some(PathBuf::from("x/app.zip")));
        assert_eq!(under(root, Path::new("/srv/a")), Some(PathBuf::new()));
        assert_eq!(under(root, Path::new("/srv/a/../b/app.zip")), None);
        assert_eq!(under(root, Path::new("/srv/ab/app.zip")), None);
        assert_eq!(under(root, Path::new("/etc/passwd")), None);
        assert_eq!(under(root, Path::new("srv/a/x")), None);
    }
}
