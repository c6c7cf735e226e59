//! The ARM64 `minimal` base: the x86-64 recipe (`base/busybox.rs`: Debian bookworm's
//! busybox source, busybox's default configuration with every applet, static) built with
//! Debian's cross toolchain (`gcc-aarch64-linux-gnu`, `libc6-dev-arm64-cross`, which
//! `scripts/setup-host.sh` installs), laid out the same way in
//! `$HEARTH_HOME/arm64/rootfs/busybox-v<N>.ext4`.

use crate::base::Base;
use crate::{io, RootfsError};
use hearth_vmm::arch::Arch;
use std::path::{Path, PathBuf};

/// Version of the ARM64 busybox image recipe; part of its file name. 2: cross-compiled
/// from source with every applet (1 was Debian's `busybox-static:arm64` as shipped).
pub const BUSYBOX_ARM64_VERSION: u32 = 2;

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

/// Builds the ARM64 busybox base unless it is there; returns its path. Blocks while
/// another builder holds the base's lock, then uses what it built.
pub fn ensure_busybox(home: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf, RootfsError> {
    let out = busybox_path(home);
    if out.is_file() {
        return Ok(out);
    }
    let dir = out.parent().expect("a file in rootfs/");
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let _lock = crate::base::lock(&dir.join(format!(".busybox-v{BUSYBOX_ARM64_VERSION}.lock")), &|| {
        progress("waiting for another build of the arm64 minimal base")
    })?;
    if !out.is_file() {
        crate::base::busybox::build(home, Arch::Aarch64, &out, progress)?;
    }
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
