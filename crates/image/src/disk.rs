//! Root disk sizes: every root disk is at least [`DEFAULT_DISK_GIB`] (the bases are made
//! that size, sparse), and an image may ask for a bigger one, up to [`MAX_DISK_GIB`].
//!
//! A bigger disk costs nothing up front either: the builder's qcow2 overlay gets a larger
//! virtual size (`qemu-img resize`, metadata only), the agent grows the ext4 filesystem
//! online to fill it when the builder boots (`EXT4_IOC_RESIZE_FS`), and the image's
//! snapshot keeps the grown filesystem, so every microvm of the image has it. The host
//! pays only for blocks the guest writes. A disk is never shrunk: an image built on
//! another (`FROM hearth/…`) keeps at least its parent's size.

use std::path::Path;
use std::process::Command;

/// The root disk's size when an image asks for none, in GiB.
pub const DEFAULT_DISK_GIB: u64 = crate::ext4::DEFAULT_DISK_MIB >> 10;

/// The largest root disk an image may ask for, in GiB. The disk is sparse, but a guest
/// may fill it: this bounds what one microvm can take from the host's disk.
pub const MAX_DISK_GIB: u64 = 256;

/// The image tag (API builds) that sets the root disk's size in GiB.
pub const TAG_DISK_SIZE: &str = "hearth:disk-size-gib";

/// Checks a requested disk size in GiB.
///
/// # Errors
///
/// A sentence naming the allowed range when `text` is not a whole number of GiB from
/// [`DEFAULT_DISK_GIB`] to [`MAX_DISK_GIB`].
pub fn parse_gib(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|g| (DEFAULT_DISK_GIB..=MAX_DISK_GIB).contains(g))
        .ok_or_else(|| format!("the root disk size must be a whole number of GiB from {DEFAULT_DISK_GIB} to {MAX_DISK_GIB}, not {text:?}"))
}

/// A qcow2 or raw disk's virtual size in bytes (`qemu-img info`).
///
/// # Errors
///
/// `qemu-img`'s failure, or output without a size.
pub fn virtual_size(disk: &Path) -> Result<u64, String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .map_err(|e| format!("cannot run qemu-img ({e}); run `{}`", hearth_vmm::home::SETUP_COMMAND))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    v["virtual-size"].as_u64().ok_or_else(|| "qemu-img info gave no virtual-size".into())
}

/// Makes the qcow2 overlay `disk` at least `gib` GiB (never smaller than it is).
///
/// # Errors
///
/// `qemu-img`'s failure.
pub fn grow_qcow2(disk: &Path, gib: u64) -> Result<(), String> {
    let want = gib << 30;
    if virtual_size(disk)? >= want {
        return Ok(());
    }
    let out = Command::new("qemu-img")
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(disk)
        .arg(want.to_string())
        .output()
        .map_err(|e| format!("cannot run qemu-img ({e}); run `{}`", hearth_vmm::home::SETUP_COMMAND))?;
    if !out.status.success() {
        return Err(format!("grow the root disk to {gib} GiB: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// What a build's failure says when its output shows the disk filled up (the strerror of
/// ENOSPC, as libc, Python and npm print it), or `None`.
pub fn full_hint(output: &str, gib: u64) -> Option<String> {
    output.to_ascii_lowercase().contains("no space left on device").then(|| {
        format!(
            "the image's root disk ({gib} GiB) is full; give the image a bigger one with its tag {TAG_DISK_SIZE} (up to {MAX_DISK_GIB})"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_whole_gib_in_range() {
        assert_eq!(parse_gib("8"), Ok(8));
        assert_eq!(parse_gib(" 64 "), Ok(64));
        assert_eq!(parse_gib(&MAX_DISK_GIB.to_string()), Ok(MAX_DISK_GIB));
        for bad in ["7", "0", "-1", "1.5", "", "257", "99999999999999999999", "8G"] {
            let e = parse_gib(bad).unwrap_err();
            assert!(e.contains("from 8 to 256"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_full_disk_is_recognised_in_any_tool_s_words() {
        for out in [
            "cp: write error: No space left on device",
            "OSError: [Errno 28] No space left on device",
            "npm ERR! ENOSPC: no space left on device, write",
        ] {
            let h = full_hint(out, 8).unwrap();
            assert!(h.contains("8 GiB") && h.contains(TAG_DISK_SIZE), "{h}");
        }
        assert_eq!(full_hint("exit code 1", 8), None);
    }

    #[test]
    fn an_overlay_grows_and_never_shrinks() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.raw");
        std::fs::File::create(&base).unwrap().set_len(8 << 30).unwrap();
        let overlay = tmp.path().join("o.qcow2");
        if let Err(e) = hearth_vmm::qemu::create_overlay(&base, "raw", &overlay) {
            eprintln!("qemu-img unusable ({e}): skipped; scripts/setup-host.sh installs it");
            return;
        }
        assert_eq!(virtual_size(&overlay).unwrap(), 8 << 30);
        grow_qcow2(&overlay, 16).unwrap();
        assert_eq!(virtual_size(&overlay).unwrap(), 16 << 30);
        grow_qcow2(&overlay, 8).unwrap();
        assert_eq!(virtual_size(&overlay).unwrap(), 16 << 30, "shrunk");
        assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20, "growing wrote data");
    }
}
