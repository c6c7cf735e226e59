//! The `minimal` base: a static busybox with every applet of its default configuration,
//! built from Debian bookworm's source package (so Debian's security patches are in it),
//! its applets linked, and the few files a shell and a resolver expect. The same source
//! and configuration make the ARM64 `minimal` (`base_arm64.rs`), cross-compiled with
//! Debian's `gcc-aarch64-linux-gnu` and `libc6-dev-arm64-cross`.
//!
//! Why not the host's `/bin/busybox` (Debian's `busybox-static`, as recipe 1 did): Debian
//! configures it without 130 of busybox's ~400 applets (`nohup`, `pgrep`, `install`,
//! `flock`, …) and without `FEATURE_WGET_TIMEOUT`, so its `wget -T` writes through a null
//! pointer and segfaults (a Debian bug fixed in 1.36.1-5). Name resolution itself works
//! in a static glibc binary (files and dns are built in since glibc 2.34) once `/etc/hosts`
//! and `/etc/nsswitch.conf` exist; the agent writes `/etc/resolv.conf` when the VM has a
//! network. The applets' links follow `busybox.links`, which busybox's build writes from
//! its configuration (a cross-built binary cannot run here to list them; for x86-64 it is
//! the same list `busybox --list-full` prints). Measured here: the source fetched in ~3 s,
//! the build ~50 s of CPU (about a minute on two cores; the arm64 cross build 52 s user +
//! 15 s sys, 1 min 11 s on two cores shared with a test run); recipe versions change
//! rarely, so it is paid once per host and architecture.

use crate::{ext4, io, RootfsError};
use hearth_vmm::arch::Arch;
use hearth_vmm::assets::run_tool;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Version of the busybox image recipe; part of its file name. 2: built from source with
/// every applet, `/etc/hosts` and `/etc/nsswitch.conf`, an 8 GiB disk.
pub const BUSYBOX_VERSION: u32 = 2;

/// Fewest applets a complete build lists (`make defconfig` gives ~400).
const MIN_APPLETS: usize = 300;

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
/// link for each applet `list` names (one path a line, as `busybox.links` or
/// `busybox --list-full` write them: `/usr/bin/nohup` or `usr/bin/nohup`), the files above
/// and an os-release naming `os_name`.
pub(crate) fn lay_out(root: &Path, busybox: &[u8], list: &[u8], os_name: &str) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "workspace"] {
        std::fs::create_dir_all(root.join(d)).map_err(io(format!("create {d}")))?;
    }
    let bin = root.join("bin/busybox");
    std::fs::write(&bin, busybox).map_err(io("write busybox"))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod busybox"))?;
    for applet in String::from_utf8_lossy(list).lines() {
        // Only plain paths beneath the root are used.
        let applet = applet.trim_start_matches('/');
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

/// Builds the `minimal` image `out` for guests of `arch`.
pub(crate) fn build(home: &Path, arch: Arch, out: &Path, progress: &dyn Fn(&str)) -> Result<(), RootfsError> {
    let work = super::scratch(&arch.home(home))?;
    let tree = compile(work.path(), arch, progress)?;
    progress("linking busybox applets");
    let bytes = std::fs::read(tree.join("busybox")).map_err(io("read busybox"))?;
    if bytes.get(18..20) != Some(&arch.elf_machine().to_le_bytes()[..]) {
        return Err(RootfsError::Invalid(format!("the busybox built for {arch} is not an {arch} binary")));
    }
    let list = std::fs::read(tree.join("busybox.links")).map_err(io("read busybox.links"))?;
    // The cross-built binary cannot be run to check it: a short list (busybox's Makefile
    // does not stop on an error in that rule) would make a base without a shell.
    let text = String::from_utf8_lossy(&list);
    let n = text.lines().filter(|l| !l.trim().is_empty()).count();
    if n < MIN_APPLETS || !text.lines().any(|l| l.trim().trim_start_matches('/') == "bin/sh") {
        return Err(RootfsError::Invalid(format!(
            "busybox's build listed {n} applets in busybox.links (at least {MIN_APPLETS} and /bin/sh expected): the build is incomplete"
        )));
    }
    let name = match arch {
        Arch::X86_64 => "Hearth minimal (busybox)",
        Arch::Aarch64 => "Hearth minimal (busybox, arm64)",
    };
    let root = work.path().join("root");
    lay_out(&root, &bytes, &list, name)?;
    progress("writing ext4 image");
    ext4::from_dir(&root, out, 0)
}

/// The GNU toolchain prefix (`make CROSS_COMPILE=`) building for `arch` on this host, with
/// the Debian packages that hold it; `None` for the host's own architecture.
fn cross(arch: Arch) -> Option<(&'static str, &'static str)> {
    (arch != Arch::host()).then_some(match arch {
        Arch::X86_64 => ("x86_64-linux-gnu-", "make, gcc-x86-64-linux-gnu and libc6-dev-amd64-cross"),
        Arch::Aarch64 => ("aarch64-linux-gnu-", "make, gcc-aarch64-linux-gnu and libc6-dev-arm64-cross"),
    })
}

/// Fetches Debian's busybox source (`apt-get source`, from the host's `deb-src` entry),
/// applies its patches and builds it static for `arch` with busybox's default
/// configuration; returns the source tree, holding `busybox` and `busybox.links`.
fn compile(work: &Path, arch: Arch, progress: &dyn Fn(&str)) -> Result<PathBuf, RootfsError> {
    let cross = cross(arch);
    let needs = cross.map_or("make, gcc and libc6-dev", |(_, packages)| packages);
    let make = || {
        let mut c = Command::new("make");
        if let Some((prefix, _)) = cross {
            c.arg(format!("CROSS_COMPILE={prefix}"));
        }
        c
    };
    if let Some((prefix, _)) = cross {
        // Found before the download and the minute of building, not after.
        run_tool(Command::new(format!("{prefix}gcc")).arg("--version")).map_err(|e| {
            RootfsError::Invalid(format!(
                "no {prefix}gcc to build the {arch} busybox ({e}); it needs {needs}: run `{}`",
                hearth_vmm::home::SETUP_COMMAND
            ))
        })?;
    }
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
    progress(&format!("building busybox for {arch} (every applet, static)"));
    run_tool(make().arg("defconfig").current_dir(&tree))?;
    let config = tree.join(".config");
    let text = std::fs::read_to_string(&config).map_err(io("read busybox's .config"))?;
    std::fs::write(&config, text.replace("# CONFIG_STATIC is not set", "CONFIG_STATIC=y")).map_err(io("write busybox's .config"))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_tool(make().arg(format!("-j{jobs}")).args(["busybox", "busybox.links"]).current_dir(&tree)).map_err(|e| {
        RootfsError::Invalid(format!(
            "building busybox for {arch} failed ({e}); it needs {needs}: run `{}`",
            hearth_vmm::home::SETUP_COMMAND
        ))
    })?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_links_stay_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let list = b"/bin/ash\nusr/bin/nohup\n/linuxrc\n/bin/busybox\n/../escape\nusr/../../escape2\n\n";
        lay_out(&root, b"\x7fELF", list, "test").unwrap();
        for applet in ["bin/ash", "usr/bin/nohup", "linuxrc"] {
            assert_eq!(std::fs::read_link(root.join(applet)).unwrap(), Path::new("/bin/busybox"), "{applet}");
        }
        assert_eq!(std::fs::read(root.join("bin/busybox")).unwrap(), b"\x7fELF");
        assert!(!dir.path().join("escape").exists() && !dir.path().join("escape2").exists());
        assert!(std::fs::read_to_string(root.join("etc/os-release")).unwrap().contains("NAME=\"test\""));
    }

    #[test]
    fn only_a_foreign_architecture_is_cross_compiled() {
        assert!(cross(Arch::host()).is_none());
        for arch in Arch::ALL.into_iter().filter(|a| *a != Arch::host()) {
            assert!(cross(arch).is_some_and(|(prefix, _)| prefix.ends_with("-linux-gnu-")), "{arch}");
        }
    }
}
