//! The ARM64 busybox base: Debian's `busybox-static` for `arm64`, fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` (never installed: it cannot run on
//! an x86-64 host), laid out as the x86-64 busybox base is, in
//! `$HEARTH_HOME/arm64/rootfs/busybox-v<N>.ext4`.
//!
//! The applets' names and places come from the host's own `busybox --list-full` (Debian's
//! `busybox-static`, which `scripts/setup-host.sh` installs): the ARM64 binary cannot run
//! here, and Debian builds both from one configuration. The package is fetched at the
//! host's version when apt still has it, so the lists match. An applet the ARM64 binary
//! lacked would only answer "applet not found".
//!
//! Unlike the x86-64 `minimal` (compiled from source with every applet, `base/busybox.rs`),
//! this is Debian's configuration as shipped: ~130 applets fewer (`nohup`, `pgrep`, …)
//! and a `wget -T` that crashes. Compiling it needs a cross toolchain
//! (`gcc-aarch64-linux-gnu`, `libc6-dev-arm64-cross`): not done yet.

use crate::base::Base;
use crate::{ext4, io, RootfsError};
use hearth_vmm::arch::Arch;
use hearth_vmm::assets::run_tool;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Version of the ARM64 busybox image recipe; part of its file name.
pub const BUSYBOX_ARM64_VERSION: u32 = 1;
/// Debian's package holding a static busybox.
const PACKAGE: &str = "busybox-static";

/// The ARM64 busybox base's path in `home`.
pub fn busybox_path(home: &Path) -> PathBuf {
    Arch::Aarch64.home(home).join(format!("rootfs/busybox-v{BUSYBOX_ARM64_VERSION}.ext4"))
}

/// The image of `base` for guests of `arch`; an error naming what exists when there is
/// none (the Debian base is x86-64 only: building it for ARM64 would need the foreign
/// architecture's maintainer scripts to run, i.e. binfmt emulation on the host).
pub fn path_for(base: Base, arch: Arch, home: &Path) -> Result<PathBuf, RootfsError> {
    match (arch, base) {
        (Arch::X86_64, b) => Ok(b.path(home)),
        (Arch::Aarch64, Base::Busybox) => Ok(busybox_path(home)),
        (Arch::Aarch64, b) => Err(RootfsError::Invalid(format!("the {b:?} base is not available for arm64 guests; use busybox"))),
    }
}

/// Builds the ARM64 busybox base unless it is there; returns its path.
pub fn ensure_busybox(home: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf, RootfsError> {
    let out = busybox_path(home);
    if out.is_file() {
        return Ok(out);
    }
    let host_busybox = Path::new("/bin/busybox");
    if !host_busybox.is_file() {
        return Err(RootfsError::Invalid(format!(
            "/bin/busybox not found (its applet list lays out the arm64 base); install busybox-static with `{}`",
            hearth_vmm::home::SETUP_COMMAND
        )));
    }
    let dir = out.parent().expect("a file in rootfs/");
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let work = tempfile::Builder::new().prefix(".build-").tempdir_in(dir).map_err(io("create build directory"))?;

    progress("downloading busybox-static for arm64");
    let pkg = format!("{PACKAGE}:{}", Arch::Aarch64.debian());
    let host_version = run_tool(Command::new("dpkg-query").args(["-W", "-f", "${Version}", PACKAGE]))
        .ok()
        .map(|v| String::from_utf8_lossy(&v).trim().to_owned())
        .filter(|v| !v.is_empty());
    let pinned = host_version.map(|v| format!("{pkg}={v}"));
    let download = |spec: &str| run_tool(Command::new("apt-get").arg("download").arg(spec).current_dir(work.path()));
    // The host's version when apt still has it, else apt's candidate.
    let fetched = match &pinned {
        Some(p) => download(p).or_else(|_| download(&pkg)),
        None => download(&pkg),
    };
    fetched.map_err(|e| {
        RootfsError::Invalid(format!(
            "cannot download {pkg} ({e}); add the architecture with `dpkg --add-architecture arm64` and `apt-get update`"
        ))
    })?;
    let deb = std::fs::read_dir(work.path())
        .map_err(io("list download"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| RootfsError::Invalid(format!("apt-get download {pkg} produced no .deb")))?;
    let unpacked = work.path().join("deb");
    run_tool(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let busybox = std::fs::read(unpacked.join("bin/busybox")).map_err(io("read the arm64 busybox"))?;
    if busybox.get(18..20) != Some(&Arch::Aarch64.elf_machine().to_le_bytes()[..]) {
        return Err(RootfsError::Invalid(format!("{} holds no arm64 busybox", deb.display())));
    }

    progress("building the arm64 busybox root filesystem");
    let root = work.path().join("root");
    // The arm64 binary cannot run here: the host's busybox of the same version lists the
    // applets.
    let list = run_tool(Command::new(host_busybox).arg("--list-full"))?;
    crate::base::busybox::lay_out(&root, &busybox, &list, "Hearth minimal (busybox, arm64)")?;
    ext4::from_dir(&root, &out, 192)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm64_bases_live_apart_and_debian_is_refused() {
        let home = Path::new("/h");
        assert_eq!(path_for(Base::Busybox, Arch::X86_64, home).unwrap(), Base::Busybox.path(home));
        let arm = path_for(Base::Busybox, Arch::Aarch64, home).unwrap();
        assert!(arm.starts_with("/h/arm64/rootfs"), "{}", arm.display());
        let e = path_for(Base::DebianBookworm, Arch::Aarch64, home).unwrap_err().to_string();
        assert!(e.contains("arm64") && e.contains("busybox"), "{e}");
    }
}
