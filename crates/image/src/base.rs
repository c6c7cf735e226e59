//! Managed base images, built by Hearth from Debian's packages and cached by version in
//! `$HEARTH_HOME/rootfs/`.

use crate::{ext4, io, RootfsError};
use hearth_vmm::assets::run_tool;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Version of the busybox image recipe; part of its file name.
pub const BUSYBOX_VERSION: u32 = 1;
/// Version of the Debian image recipe; part of its file name.
pub const DEBIAN_VERSION: u32 = 1;
/// Packages added to Debian's minbase.
pub const DEBIAN_PACKAGES: &[&str] = &["python3"];

/// The managed base images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// A static busybox and nothing else; boots fastest.
    Busybox,
    /// Debian bookworm minbase with python3.
    DebianBookworm,
}

impl std::str::FromStr for Base {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busybox" | "minimal" => Ok(Base::Busybox),
            "debian" | "debian-bookworm" => Ok(Base::DebianBookworm),
            _ => Err(format!("unknown base image {s:?}; use busybox or debian-bookworm")),
        }
    }
}

impl Base {
    /// Where the built image lives.
    pub fn path(self, home: &Path) -> PathBuf {
        let dir = home.join("rootfs");
        match self {
            Base::Busybox => dir.join(format!("busybox-v{BUSYBOX_VERSION}.ext4")),
            Base::DebianBookworm => dir.join(format!("debian-bookworm-v{DEBIAN_VERSION}.ext4")),
        }
    }

    /// Builds the image unless it is already there; returns its path.
    pub fn ensure(self, home: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf, RootfsError> {
        let out = self.path(home);
        if out.is_file() {
            return Ok(out);
        }
        match self {
            Base::Busybox => build_busybox(home, &out, progress)?,
            Base::DebianBookworm => build_debian(home, &out, progress)?,
        }
        Ok(out)
    }
}

fn scratch(home: &Path) -> Result<tempfile::TempDir, RootfsError> {
    let dir = home.join("rootfs");
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    tempfile::Builder::new().prefix(".build-").tempdir_in(&dir).map_err(io("create build directory"))
}

fn build_busybox(home: &Path, out: &Path, progress: &dyn Fn(&str)) -> Result<(), RootfsError> {
    progress("building busybox root filesystem");
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err(RootfsError::Invalid(format!(
            "/bin/busybox not found; install busybox-static with `{}`",
            hearth_vmm::home::SETUP_COMMAND
        )));
    }
    let work = scratch(home)?;
    let root = work.path().join("root");
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "workspace"] {
        std::fs::create_dir_all(root.join(d)).map_err(io(format!("create {d}")))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(io("copy busybox"))?;
    let list = run_tool(Command::new(busybox).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&list).lines() {
        let link = root.join(applet);
        if applet.is_empty() || applet == "bin/busybox" || link.exists() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io("create applet dir"))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io(format!("link {applet}")))?;
    }
    let files = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "hearth\n"),
        ("etc/os-release", "NAME=\"Hearth busybox\"\nID=hearth-busybox\n"),
    ];
    for (name, text) in files {
        std::fs::write(root.join(name), text).map_err(io(format!("write {name}")))?;
    }
    ext4::from_dir(&root, out, 192)
}

fn build_debian(home: &Path, out: &Path, progress: &dyn Fn(&str)) -> Result<(), RootfsError> {
    let mirror = crate::apt::debian_mirror("bookworm")
        .ok_or_else(|| RootfsError::Invalid("no Debian bookworm source in the host's apt configuration to build from".into()))?;
    let work = scratch(home)?;
    let root = work.path().join("root");
    progress(&format!("running mmdebstrap (minbase + {})", DEBIAN_PACKAGES.join(", ")));
    run_tool(
        Command::new("mmdebstrap")
            .args(["--quiet", "--variant=minbase", "--components=main"])
            .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")))
            .args(["bookworm"])
            .arg(&root)
            .arg(&mirror),
    )?;
    std::fs::create_dir_all(root.join("workspace")).map_err(io("create /workspace"))?;
    progress("writing ext4 image");
    ext4::from_dir(&root, out, 1024)
}
