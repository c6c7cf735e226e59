//! ext4 images from a directory or a tarball, made by `mkfs.ext4 -d` (no mounts, no root
//! privileges beyond reading the source). Images are sparse: free space costs no disk.

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

/// Makes `out` an ext4 image of `dir` with `free_mib` MiB of room beyond its contents.
/// The image is written beside `out` and renamed into place, so `out` is never partial.
pub fn from_dir(dir: &Path, out: &Path, free_mib: u64) -> Result<(), RootfsError> {
    let used_mib = tree_size(dir) / (1 << 20);
    let size_mib = (used_mib + used_mib / 4 + free_mib).max(64);
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    let tmp = tempfile::Builder::new().prefix(".ext4-").tempfile_in(parent).map_err(io("create image file"))?;
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "hearth-root", "-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(tmp.path())
            .arg(format!("{size_mib}M")),
    )?;
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
