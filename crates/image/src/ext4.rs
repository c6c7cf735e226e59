//! ext4 images from a directory or a tarball, made by `mkfs.ext4 -d` (no mounts, no root
//! privileges beyond reading the source). Images are sparse: free space costs no disk.
//!
//! Every image is at least [`DEFAULT_DISK_MIB`] (8 GiB, a root disk as roomy as the
//! service's) and costs what its files take plus a few MiB of metadata: an 8 GiB image of
//! busybox is ~8 MiB on the host (`du`), its `ls -l` size 8 GiB. The journal is not zeroed
//! (`lazy_journal_init`): the file is new, so its unwritten blocks read as zeros already;
//! zeroing would write 64 MiB. The guest mounts with `noinit_itable` for the same reason.

use crate::{io, RootfsError};
use hearth_vmm::assets::run_tool;
use std::path::Path;
use std::process::Command;

/// Total size of the regular files under `dir`, in bytes.
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len() + 4096;
            }
        }
    }
    total
}

/// The smallest root filesystem Hearth makes, in MiB: 8 GiB.
pub const DEFAULT_DISK_MIB: u64 = 8 << 10;

/// The image size for `used_mib` of files and `free_mib` of room: a quarter over the
/// files for metadata, and never under [`DEFAULT_DISK_MIB`].
pub fn image_mib(used_mib: u64, free_mib: u64) -> u64 {
    (used_mib + used_mib / 4 + free_mib).max(DEFAULT_DISK_MIB)
}

/// Makes `out` an ext4 image of `dir` with at least `free_mib` MiB of room beyond its
/// contents, and at least [`DEFAULT_DISK_MIB`] in all (sparse).
/// The image is written beside `out` and renamed into place, so `out` is never partial.
pub fn from_dir(dir: &Path, out: &Path, free_mib: u64) -> Result<(), RootfsError> {
    let size_mib = image_mib(tree_size(dir) / (1 << 20), free_mib);
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    let tmp = tempfile::Builder::new().prefix(".ext4-").tempfile_in(parent).map_err(io("create image file"))?;
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "hearth-root", "-E", "root_owner=0:0,lazy_journal_init=1", "-d"])
            .arg(dir)
            .arg(tmp.path())
            .arg(format!("{size_mib}M")),
    )?;
    // Readable by all, as the file mkfs would create: a VM run under another user (the
    // jail) opens it read-only as its backing file. The temporary file is 0600.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).map_err(io("set the image's mode"))?;
    tmp.persist(out).map_err(|e| RootfsError::Io { what: format!("install {}", out.display()), source: e.error })?;
    Ok(())
}

/// Makes `out` an ext4 image of a tarball's contents. Entries are unpacked into a scratch
/// directory by the `tar` crate, which refuses absolute paths and `..`.
pub fn from_tar(tarball: &Path, out: &Path, free_mib: u64) -> Result<(), RootfsError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    let scratch = tempfile::Builder::new().prefix(".untar-").tempdir_in(parent).map_err(io("create scratch dir"))?;
    let file = std::fs::File::open(tarball).map_err(io(format!("open {}", tarball.display())))?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(false);
    archive.unpack(scratch.path()).map_err(io(format!("unpack {}", tarball.display())))?;
    from_dir(scratch.path(), out, free_mib)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn images_are_at_least_the_default_size() {
        assert_eq!(image_mib(0, 0), DEFAULT_DISK_MIB);
        assert_eq!(image_mib(100, 1024), DEFAULT_DISK_MIB);
        assert_eq!(image_mib(8000, 1024), 8000 + 2000 + 1024);
    }

    /// An 8 GiB image of a small tree is 8 GiB long and takes a few MiB: free space and the
    /// journal are holes.
    #[test]
    fn an_image_is_sparse() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("mkfs.ext4 missing: skipped (scripts/setup-host.sh installs e2fsprogs)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("root");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hostname"), "hearth\n").unwrap();
        let out = tmp.path().join("img.ext4");
        from_dir(&dir, &out, 0).unwrap();
        let m = std::fs::metadata(&out).unwrap();
        assert_eq!(m.len(), DEFAULT_DISK_MIB << 20);
        assert!(m.blocks() * 512 < 32 << 20, "an empty 8 GiB image takes {} bytes on the host", m.blocks() * 512);
    }
}
