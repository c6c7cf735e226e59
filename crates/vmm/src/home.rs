//! The state directory (`$HEARTH_HOME`) and its layout.
//!
//! ```text
//! $HEARTH_HOME/
//!   kernel/<release>/vmlinuz, modules/*.ko   guest kernel, unpacked from Debian's package
//!   agent/hearth-agent                          the static agent installed by `hearth setup`
//!   initramfs/<hash>.cpio                       built from the agent and the modules
//!   rootfs/<name>-v<N>.ext4                     base root filesystems
//!   run/<vm-id>/                                one running VM: sockets, console, overlay
//!   arm64/{kernel,agent,initramfs,rootfs}/      the same for ARM64 guests ([`crate::arch`])
//! ```

use std::path::PathBuf;

/// The state directory: `$HEARTH_HOME`, else `/var/lib/hearth` for root, else
/// `$XDG_DATA_HOME/hearth` or `~/.local/share/hearth`.
pub fn hearth_home() -> PathBuf {
    if let Some(h) = std::env::var_os("HEARTH_HOME").filter(|h| !h.is_empty()) {
        // Absolute and without symlinks: QEMU records backing files by the paths it is
        // given, and layer chains are compared by path.
        let p = PathBuf::from(h);
        return std::fs::canonicalize(&p).unwrap_or_else(|_| std::path::absolute(&p).unwrap_or(p));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/hearth");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("hearth");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/hearth")
}

/// The command that installs host packages, kernel and agent; named in every
/// "missing set-up" error.
pub const SETUP_COMMAND: &str = "./scripts/setup.sh";
