//! Root filesystems for Hearth VMs.
//!
//! - [`ext4`]: ext4 images made from a directory or a tarball with `mkfs.ext4 -d`, without
//!   mounting anything.
//! - [`base`]: the managed base images Hearth builds itself: `minimal` (a static busybox
//!   with every applet, for fast tests), `debian-bookworm` (mmdebstrap minbase + everyday
//!   tools), `python` and `nodejs`; [`base_arm64`]:
//!   the busybox base for ARM64 guests.
//! - [`disk`]: root disk sizes (8 GiB by default, bigger per image, sparse).
//! - [`apt`]: the Debian mirror the host already uses, derived from its apt sources.
//! - [`artifact`]: code artifacts (zip with a Dockerfile at the root), extracted safely.
//! - [`beneath`]: a directory handle whose paths never leave it nor pass through a link.
//! - [`dockerfile`]: Dockerfiles parsed (`dockerfile-parser`) into a validated build plan.
//! - [`oci`]: import of `docker save` / OCI layout archives (layers, whiteouts) as ext4.
//! - [`registry`]: images pulled from OCI registries for `FROM <reference>`, flattened
//!   into ext4 and cached by digest.
//! - [`expand`]: Dockerfile variable substitution.
//! - [`build`]: the plan run in a builder microVM, the app started and checked, the
//!   template snapshot; [`layers`]: the layer cache; [`store`]: image versions.

#![deny(missing_docs)]

pub mod apt;
pub mod artifact;
pub mod base;
pub mod base_arm64;
pub mod beneath;
pub mod build;
pub mod disk;
pub mod dockerfile;
pub mod expand;
pub mod ext4;
pub mod layers;
pub mod oci;
pub mod registry;
pub mod store;

/// A failure building a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error(transparent)]
    Tool(#[from] hearth_vmm::assets::AssetError),
    /// The input is unusable.
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let what = what.into();
    move |source| RootfsError::Io { what, source }
}
