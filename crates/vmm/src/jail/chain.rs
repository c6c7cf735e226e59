//! The files a disk image reads: itself and its qcow2 backing chain, read from the
//! headers (no `qemu-img` process), so each can be bound into the jail read-only.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Longest chain followed (image builds stack one layer per step).
pub const MAX_DEPTH: usize = 256;
/// QEMU's own limit on a backing file name.
const MAX_NAME: u32 = 1023;

/// The backing file named in the qcow2 header of `image`, if it is a qcow2 with one.
/// A relative name is relative to the image's directory, as QEMU reads it.
pub fn backing_file(image: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut f = std::fs::File::open(image)?;
    let mut h = [0u8; 20];
    if f.read_exact(&mut h).is_err() || &h[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > MAX_NAME {
        return Err(std::io::Error::other(format!("{}: backing file name of {size} bytes", image.display())));
    }
    let mut name = vec![0u8; size as usize];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    let name = PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name));
    Ok(Some(if name.is_absolute() { name } else { image.parent().unwrap_or(Path::new("/")).join(name) }))
}

/// `image`'s backing files, nearest first (not `image` itself).
pub fn backing_chain(image: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut chain = Vec::new();
    let mut cur = image.to_path_buf();
    while let Some(next) = backing_file(&cur)? {
        if chain.len() == MAX_DEPTH {
            return Err(std::io::Error::other(format!("{}: backing chain deeper than {MAX_DEPTH}", image.display())));
        }
        chain.push(next.clone());
        cur = next;
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(path: &Path, backing: Option<&str>) {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        if let Some(b) = backing {
            h[8..16].copy_from_slice(&104u64.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[104..104 + b.len()].copy_from_slice(b.as_bytes());
        }
        std::fs::write(path, h).unwrap();
    }

    #[test]
    fn follows_absolute_and_relative_names() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("base.raw"), b"raw bytes").unwrap();
        qcow2(&d.path().join("l1.qcow2"), Some(&d.path().join("base.raw").display().to_string()));
        qcow2(&d.path().join("l2.qcow2"), Some("l1.qcow2"));
        let chain = backing_chain(&d.path().join("l2.qcow2")).unwrap();
        assert_eq!(chain, vec![d.path().join("l1.qcow2"), d.path().join("base.raw")]);
        assert!(backing_chain(&d.path().join("base.raw")).unwrap().is_empty());
    }

    #[test]
    fn a_loop_is_refused() {
        let d = tempfile::tempdir().unwrap();
        qcow2(&d.path().join("a.qcow2"), Some("a.qcow2"));
        assert!(backing_chain(&d.path().join("a.qcow2")).is_err());
    }
}
