//! Where a stage starts: the FROM rule's answer ([`dockerfile::from_source`]) made into a
//! disk to boot the builder on, with the configuration it inherits.

use super::{BuildError, BuildRequest, ImageConfig};
use crate::dockerfile::{self, FromSource};
use hearth_vmm::DiskFormat;
use std::path::{Path, PathBuf};

/// A stage's starting disk.
pub(super) struct Start {
    /// The disk (the builder writes into an overlay on it).
    pub rootfs: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// How the log names it.
    pub label: String,
    /// The configuration it brings (ENV, WORKDIR, USER; a Hearth image's app too).
    pub config: Option<ImageConfig>,
}

/// The disk a stage whose FROM is `from` starts on, pulling it from its registry when it
/// is an OCI reference.
pub(super) async fn start(
    req: &BuildRequest,
    from: Option<&str>,
    arch: hearth_vmm::Arch,
    home: &Path,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<Start, BuildError> {
    let base_name = req.base.name();
    match dockerfile::from_source(from, req.base) {
        // `FROM hearth/NAME[:vN]` builds on another image: its disk, its configuration.
        FromSource::Hearth(r) => {
            let from = req.images.resolve(r).map_err(|e| BuildError::Context(format!("FROM hearth/{r}: {e}")))?;
            if !from.disk.is_file() {
                return Err(BuildError::Context(format!("FROM hearth/{r}: image {} has no disk to build on", from.label)));
            }
            if let Some(a) = super::from_arch(&from.disk).filter(|a| *a != arch) {
                return Err(BuildError::Context(format!(
                    "FROM hearth/{r}: image {} is an {a} image and this build is for {arch}; build on an image of the same architecture",
                    from.label
                )));
            }
            Ok(Start { rootfs: from.disk, format: DiskFormat::Qcow2, label: from.label, config: from.config })
        }
        FromSource::Base => {
            let rootfs = crate::base_arm64::path_for(req.base, arch, home).map_err(|e| BuildError::Context(e.to_string()))?;
            if !rootfs.is_file() {
                return Err(BuildError::Context(format!("base image {base_name} is not built; run `hearth base build {base_name}`")));
            }
            Ok(Start { rootfs, format: DiskFormat::Raw, label: base_name.to_owned(), config: None })
        }
        FromSource::Registry(r) => {
            let mut src = req.images.registry().map_err(|e| {
                BuildError::Context(format!("FROM {r}: {e}; build on a managed base (FROM {base_name}) or FROM hearth/<image>"))
            })?;
            src.arch = arch.into();
            let pulled = crate::registry::pull(r, &src, log).await.map_err(|e| BuildError::Context(e.to_string()))?;
            let mut config = ImageConfig { workdir: "/".into(), ..Default::default() };
            config.env.extend(pulled.config.env);
            if let Some(w) = pulled.config.workdir {
                config.workdir = w;
            }
            config.user = pulled.config.user;
            let label = format!("{}@{}", pulled.reference, pulled.digest);
            Ok(Start { rootfs: pulled.rootfs, format: DiskFormat::Raw, label, config: Some(config) })
        }
    }
}
