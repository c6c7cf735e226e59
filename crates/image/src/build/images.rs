//! What a build's `FROM hearth/NAME[:vN]` resolves to ([`ImageResolver`]), and where its
//! `FROM <OCI reference>` pulls from: the host's store for the operator's builds
//! ([`HostImages`]), nothing ([`NoImages`]), or the API's per-tenant resolver.

use super::ImageConfig;
use std::path::PathBuf;

/// An image a Dockerfile's `FROM hearth/NAME[:vN]` builds on: its disk, its configuration.
#[derive(Debug, Clone)]
pub struct FromImage {
    /// The image version's root disk (qcow2), the build's backing file.
    pub disk: PathBuf,
    /// How the build log names it (`hearth/NAME:vN`).
    pub label: String,
    /// Its runtime configuration, inherited as Docker's FROM does.
    pub config: Option<ImageConfig>,
}

/// Resolves `FROM hearth/<reference>` (`NAME` or `NAME:vN`) to an image to build on, and
/// says where `FROM <OCI reference>` pulls from.
pub trait ImageResolver: Send + Sync {
    /// The image `reference` names, or why there is none (shown to whoever builds).
    fn resolve(&self, reference: &str) -> Result<FromImage, String>;

    /// The registries this build may pull from, its caches and settings, or why it may not
    /// (shown to whoever builds).
    fn registry(&self) -> Result<crate::registry::Source, String> {
        Err("this build cannot pull images from registries".into())
    }
}

impl std::fmt::Debug for dyn ImageResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageResolver")
    }
}

/// The host's image store under `$HEARTH_HOME` (`hearth images local build`, the operator's).
#[derive(Debug, Clone)]
pub struct HostImages(pub PathBuf);

impl ImageResolver for HostImages {
    fn resolve(&self, r: &str) -> Result<FromImage, String> {
        let rec = crate::store::resolve(&self.0, r).map_err(|e| e.to_string())?;
        let disk = crate::store::version_dir(&self.0, &rec.name, rec.version).join("snapshot").join("disk.qcow2");
        Ok(FromImage { disk, label: format!("hearth/{}:v{}", rec.name, rec.version), config: rec.config })
    }

    /// The operator's own builds: `$HEARTH_HOME/registries.json`, any registry address,
    /// one cache (`$HEARTH_HOME/oci/`) whoever's credentials.
    fn registry(&self) -> Result<crate::registry::Source, String> {
        let config = crate::registry::RegistryConfig::load(&self.0)?;
        let cache = self.0.join("oci");
        Ok(crate::registry::Source {
            config: std::sync::Arc::new(config),
            shared: cache.clone(),
            private: cache,
            arch: crate::registry::Arch::host(),
            operator: true,
        })
    }
}

/// No images at all: `FROM hearth/…` is refused.
#[derive(Debug, Clone)]
pub struct NoImages;

impl ImageResolver for NoImages {
    fn resolve(&self, r: &str) -> Result<FromImage, String> {
        Err(format!("no image {r} to build on"))
    }
}
