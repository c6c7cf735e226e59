//! Guest architectures: what differs between an x86-64 and an ARM64 microVM.
//!
//! Everything architecture-specific is named here once (the QEMU binary, Debian's name for
//! the architecture, the kernel package, the agent's Rust target, where the assets live);
//! the QEMU command line per architecture is in [`crate::qemu`].
//!
//! An x86-64 guest's assets live at the top of `$HEARTH_HOME` (as they always have); an
//! ARM64 guest's under `$HEARTH_HOME/arm64/` with the same layout (`kernel/`, `agent/`,
//! `initramfs/`, `rootfs/`), so the two never share a file by accident.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A guest CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// x86-64 (`-M microvm`).
    #[default]
    X86_64,
    /// ARM64 / AArch64 (`-M virt`).
    Aarch64,
}

impl Arch {
    /// Every architecture Hearth can run.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The architecture of the host this binary runs on.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// True for the x86-64 default (manifests leave the field out for it, so older
    /// Hearths keep reading them).
    pub fn is_x86_64(&self) -> bool {
        *self == Arch::X86_64
    }

    /// QEMU's system emulator for the architecture.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// Debian's name for the architecture (`dpkg --print-architecture`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The Rust target the guest agent is built for (a static binary).
    pub fn agent_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's cloud kernel metapackage for the architecture (from bookworm-backports).
    pub fn kernel_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "linux-image-cloud-amd64",
            Arch::Aarch64 => "linux-image-cloud-arm64",
        }
    }

    /// The ELF `e_machine` of the architecture's binaries.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// The directory holding this architecture's guest assets inside `home`.
    pub fn home(self, home: &Path) -> PathBuf {
        match self {
            Arch::X86_64 => home.to_path_buf(),
            Arch::Aarch64 => home.join("arm64"),
        }
    }

    /// The name used on the command line and in records (`x86_64`, `arm64`).
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "arm64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" | "amd64" | "x86" => Ok(Arch::X86_64),
            "aarch64" | "arm64" | "arm_64" => Ok(Arch::Aarch64),
            _ => Err(format!("unknown architecture {s:?}; use x86_64 or arm64")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_assets_are_apart() {
        for a in Arch::ALL {
            assert_eq!(a.as_str().parse::<Arch>(), Ok(a));
        }
        assert_eq!("ARM_64".parse::<Arch>(), Ok(Arch::Aarch64));
        assert!("riscv64".parse::<Arch>().is_err());
        let home = Path::new("/h");
        assert_eq!(Arch::X86_64.home(home), home);
        assert_ne!(Arch::Aarch64.home(home), home);
        assert_eq!(serde_json::to_string(&Arch::Aarch64).unwrap(), "\"aarch64\"");
    }
}
