//! The Debian bases: `mmdebstrap --variant=minbase` of bookworm from the host's own
//! mirror, with a recipe's packages, written as an ext4 image.

use crate::{ext4, io, RootfsError};
use hearth_vmm::assets::run_tool;
use std::path::Path;
use std::process::Command;

/// Version of the `debian-bookworm` recipe; part of its file name. 2: everyday tools, an
/// 8 GiB disk.
pub const DEBIAN_VERSION: u32 = 2;
/// Version of the `python` recipe; part of its file name.
pub const PYTHON_VERSION: u32 = 1;
/// Version of the `nodejs` recipe; part of its file name.
pub const NODE_VERSION: u32 = 1;

/// Packages added to Debian's minbase in every Debian base: what a user expects to find
/// in a shell (a pager, an editor, `ps`, `ip`, `curl` with CA certificates) and python3.
pub const DEBIAN_PACKAGES: &[&str] =
    &["ca-certificates", "curl", "iproute2", "iputils-ping", "less", "nano", "netbase", "procps", "python3", "vim-tiny"];
/// Added for the `python` base.
pub const PYTHON_PACKAGES: &[&str] = &["python3-pip", "python3-venv"];
/// Added for the `nodejs` base.
pub const NODE_PACKAGES: &[&str] = &["nodejs", "npm"];

/// Builds `out` from minbase and `packages`.
pub(super) fn build(home: &Path, out: &Path, packages: &[&str], progress: &dyn Fn(&str)) -> Result<(), RootfsError> {
    let mirror = crate::apt::debian_mirror("bookworm")
        .ok_or_else(|| RootfsError::Invalid("no Debian bookworm source in the host's apt configuration to build from".into()))?;
    let work = super::scratch(home)?;
    let root = work.path().join("root");
    progress(&format!("running mmdebstrap (minbase + {})", packages.join(", ")));
    run_tool(
        Command::new("mmdebstrap")
            .args(["--quiet", "--variant=minbase", "--components=main"])
            .arg(format!("--include={}", packages.join(",")))
            // Recommends would double the Node.js base (npm recommends build tools).
            .arg("--aptopt=APT::Install-Recommends \"false\"")
            .args(["bookworm"])
            .arg(&root)
            .arg(&mirror),
    )?;
    std::fs::create_dir_all(root.join("workspace")).map_err(io("create /workspace"))?;
    progress("writing ext4 image");
    ext4::from_dir(&root, out, 0)
}
