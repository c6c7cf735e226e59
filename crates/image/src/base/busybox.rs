//! The `minimal` base: a static busybox with every applet of its default configuration,
//! built from Debian bookworm's source package (so Debian's security patches are in it),
//! its applets linked, and the few files a shell and a resolver expect.
//!
//! Why not the host's `/bin/busybox` (Debian's `busybox-static`, as recipe 1 did): Debian
//! configures it without 130 of busybox's ~400 applets (`nohup`, `pgrep`, `install`,
//! `flock`, …) and without `FEATURE_WGET_TIMEOUT`, so its `wget -T` writes through a null
//! pointer and segfaults (a Debian bug fixed in 1.36.1-5). Name resolution itself works
//! in a static glibc binary (files and dns are built in since glibc 2.34) once `/etc/hosts`
//! and `/etc/nsswitch.conf` exist; the agent writes `/etc/resolv.conf` when the VM has a
//! network. Measured here: the source fetched in ~3 s, the build ~50 s of CPU (about a
//! minute on two cores); recipe versions change rarely, so it is paid once per host.

use crate::{ext4, io, RootfsError};
use hearth_vmm::assets::run_tool;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Version of the busybox image recipe; part of its file name. 2: built from source with
/// every applet, `/etc/hosts` and `/etc/nsswitch.conf`, an 8 GiB disk.
pub const BUSYBOX_VERSION: u32 = 2;

/// Files of the image besides busybox and its links.
const FILES: &[(&str, &str)] = &[
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hostname", "hearth\n"),
    ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    (
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nservices: files\nprotocols: files\n",
    ),
];

/// Lays out a busybox root in `root`: the usual directories, `busybox` as `/bin/busybox`, a
/// link for each applet `list` (`busybox --list-full`) names, the files above and an
/// os-release naming `os_name`. The ARM64 base (`base_arm64.rs`) is laid out the same way.
pub(crate) fn lay_out(root: &Path, busybox: &[u8], list: &[u8], os_name: &str) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "workspace"] {
        std::fs::create_dir_all(root.join(d)).map_err(io(format!("create {d}")))?;
    }
    let bin = root.join("bin/busybox");
    std::fs::write(&bin, busybox).map_err(io("write busybox"))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod busybox"))?;
    for applet in String::from_utf8_lossy(list).lines() {
        // `--list-full` names paths like `usr/bin/nohup`; only plain relative ones are used.
        let rel = Path::new(applet);
        if applet.is_empty() || applet == "bin/busybox" || !rel.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            continue;
        }
        let link = root.join(rel);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io("create applet dir"))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io(format!("link {applet}")))?;
    }
    for (name, text) in FILES {
        std::fs::write(root.join(name), text).map_err(io(format!("write {name}")))?;
    }
    std::fs::write(root.join("etc/os-release"), format!("NAME=\"{os_name}\"\nID=hearth-busybox\n")).map_err(io("write etc/os-release"))
}

/// Builds the image `out`.
pub(super) fn build(home: &Path, out: &Path, progress: &dyn Fn(&str)) -> Result<(), RootfsError> {
    let work = super::scratch(home)?;
    let busybox = compile(work.path(), progress)?;
    progress("linking busybox applets");
    let root = work.path().join("root");
    let bytes = std::fs::read(&busybox).map_err(io("read busybox"))?;
    let list = run_tool(Command::new(&busybox).arg("--list-full"))?;
    lay_out(&root, &bytes, &list, "Hearth minimal (busybox)")?;
    progress("writing ext4 image");
    ext4::from_dir(&root, out, 0)
}

/// Fetches Debian's busybox source (`apt-get source`, from the host's `deb-src` entry),
/// applies its patches and builds it static with busybox's default configuration.
fn compile(work: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf, RootfsError> {
    let src = work.join("src");
    std::fs::create_dir_all(&src).map_err(io("create the source directory"))?;
    progress("fetching Debian's busybox source");
    run_tool(Command::new("apt-get").args(["source", "--download-only", "-qq", "busybox"]).current_dir(&src)).map_err(|e| {
        RootfsError::Invalid(format!(
            "cannot fetch busybox's source ({e}); the host needs a deb-src entry for bookworm and dpkg-dev: run `{}`",
            hearth_vmm::home::SETUP_COMMAND
        ))
    })?;
    let dsc = std::fs::read_dir(&src)
        .map_err(io("read the source directory"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "dsc"))
        .ok_or_else(|| RootfsError::Invalid("apt-get source busybox left no .dsc file".into()))?;
    let tree = src.join("busybox");
    run_tool(Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree).current_dir(&src))?;
    progress("building busybox (every applet, static)");
    run_tool(Command::new("make").arg("defconfig").current_dir(&tree))?;
    let config = tree.join(".config");
    let text = std::fs::read_to_string(&config).map_err(io("read busybox's .config"))?;
    std::fs::write(&config, text.replace("# CONFIG_STATIC is not set", "CONFIG_STATIC=y")).map_err(io("write busybox's .config"))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_tool(Command::new("make").arg(format!("-j{jobs}")).arg("busybox").current_dir(&tree)).map_err(|e| {
        RootfsError::Invalid(format!(
            "building busybox failed ({e}); it needs gcc, make and libc6-dev: run `{}`",
            hearth_vmm::home::SETUP_COMMAND
        ))
    })?;
    Ok(tree.join("busybox"))
}
