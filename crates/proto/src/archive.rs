//! Directories as tar streams (`hearth cp -r`): the one packer and the one unpacker both
//! ends use (the agent in the guest, the CLI on the user's machine), so they agree on the
//! format and on what is refused. The only I/O in this crate: the format is the boundary.
//!
//! What crosses is a plain (ustar/GNU) tar of a directory's *contents*, paths relative to
//! it: regular files, directories and symbolic links (kept as links, never followed). Other
//! kinds (devices, FIFOs, sockets) are left out when packing and refused when unpacking, as
//! are hard links. Owners are not carried over: what is unpacked belongs to whoever unpacks
//! it (in a microvm, the agent's user, root), with the archive's permission bits less
//! set-id/sticky bits and its modification times.
//!
//! The unpacker takes its input as hostile: every entry's path must be relative, free of
//! `..` and at most [`MAX_PATH`] bytes; it may not pass through a symbolic link (one an
//! earlier entry made, say `a -> /etc` then `a/passwd`); there are at most [`MAX_ENTRIES`]
//! entries; after the end-of-archive marker only padding may follow. It unpacks into a
//! directory of the caller's (a fresh temporary one), which the caller renames into place
//! once it succeeded, or removes.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Most entries one archive may hold (either way).
pub const MAX_ENTRIES: u64 = 1_000_000;

/// Longest path of an entry (and of a link's target), in bytes.
pub const MAX_PATH: usize = 4096;

/// Most bytes that may follow the end-of-archive marker (tar writers pad to a record of
/// 10 KiB; anything beyond this is not padding).
const MAX_TRAILING: u64 = 1 << 20;

/// What one pack or unpack moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Entries written or unpacked.
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// Entries left out (packing: devices, FIFOs, sockets).
    pub skipped: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Writes the contents of directory `root` to `out` as a tar stream, in a stable order
/// (names sorted), without following symbolic links (`root` itself may not be one).
///
/// # Errors
///
/// `root` missing ([`io::ErrorKind::NotFound`]) or not a directory
/// ([`io::ErrorKind::NotADirectory`]); more than [`MAX_ENTRIES`] entries or a path over
/// [`MAX_PATH`] ([`io::ErrorKind::InvalidInput`]); reading or writing failed.
pub fn pack<W: Write>(root: &Path, out: W) -> io::Result<Stats> {
    let meta = std::fs::symlink_metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotADirectory, format!("{} is not a directory", root.display())));
    }
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut stats = Stats::default();
    // Depth-first, each directory's names sorted: the same tree packs to the same bytes.
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            if rel.as_os_str().len() > MAX_PATH {
                return Err(invalid(format!("{} is longer than {MAX_PATH} bytes", rel.display())));
            }
            stats.entries += 1;
            if stats.entries > MAX_ENTRIES {
                return Err(invalid(format!("{} holds more than {MAX_ENTRIES} entries", root.display())));
            }
            let path = root.join(&rel);
            let m = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Gone since it was listed: it is simply not in the archive.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
            let ft = m.file_type();
            if ft.is_dir() {
                h.set_size(0);
                b.append_data(&mut h, &rel, io::empty())?;
                subdirs.push(rel);
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                h.set_size(0);
                b.append_link(&mut h, &rel, &target)?;
            } else if ft.is_file() {
                // Opened without following a link that replaced it, nor blocking on a FIFO.
                let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path)?;
                let fm = f.metadata()?;
                if !fm.is_file() {
                    stats.skipped += 1;
                    continue;
                }
                let size = fm.len();
                h.set_size(size);
                h.set_mode(fm.mode() & 0o7777);
                // Exactly `size` bytes whatever happens to the file meanwhile: cut if it
                // grew, zero-padded if it shrank (the header is already written).
                let data = f.take(size).chain(io::repeat(0)).take(size);
                b.append_data(&mut h, &rel, data)?;
                stats.bytes += size;
            } else {
                stats.skipped += 1;
                stats.entries -= 1;
            }
        }
        // Popped in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    b.into_inner()?.flush()?;
    Ok(stats)
}

/// The relative path an entry names, checked: no root, no `..`, within [`MAX_PATH`].
/// `None` for the archive's root itself (`./`).
fn entry_path(raw: &[u8]) -> io::Result<Option<PathBuf>> {
    let shown = String::from_utf8_lossy(raw);
    if raw.len() > MAX_PATH {
        return Err(invalid(format!("archive entry {shown:.80}… is longer than {MAX_PATH} bytes")));
    }
    if raw.contains(&0) {
        return Err(invalid(format!("archive entry {shown:?} contains a NUL byte")));
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!("archive entry {shown:?} is an absolute path: entries must be relative")))
            }
            Component::ParentDir => return Err(invalid(format!("archive entry {shown:?} contains '..': entries stay beneath the target"))),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Refuses an entry whose parent, beneath `dest`, is anything but a real directory (a
/// symbolic link an earlier entry made would lead it elsewhere).
fn check_parents(dest: &Path, rel: &Path) -> io::Result<()> {
    let mut at = dest.to_path_buf();
    let Some(parent) = rel.parent() else { return Ok(()) };
    for c in parent.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(invalid(format!(
                    "archive entry {} goes through the link {}: links are not followed",
                    rel.display(),
                    c.as_os_str().to_string_lossy()
                )))
            }
            Ok(_) => return Err(invalid(format!("archive entry {}: {} is not a directory", rel.display(), at.display()))),
            // Created by tar as it unpacks (beneath dest, checked as it goes).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Unpacks a tar stream from `input` into directory `dest` (existing, normally empty and
/// the caller's own), refusing what the module's rules refuse. The input is read to its
/// end, so a caller that learns only at the end whether the input was what it should be
/// (a hash) gets to say so before this returns `Ok`.
///
/// # Errors
///
/// [`io::ErrorKind::InvalidInput`] / [`io::ErrorKind::InvalidData`] for an archive this
/// refuses or cannot read; the filesystem's errors as they are (a full disk:
/// [`io::ErrorKind::StorageFull`]); the input's.
pub fn unpack<R: Read>(input: R, dest: &Path) -> io::Result<Stats> {
    let mut ar = tar::Archive::new(input);
    ar.set_overwrite(true);
    let mut stats = Stats::default();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    {
        let entries = ar.entries().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| relabel(e, "reading the archive"))?;
            stats.entries += 1;
            if stats.entries > MAX_ENTRIES {
                return Err(invalid(format!("the archive holds more than {MAX_ENTRIES} entries")));
            }
            let raw = entry.path_bytes().into_owned();
            let Some(rel) = entry_path(&raw)? else { continue };
            let kind = entry.header().entry_type();
            let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
            check_parents(dest, &rel)?;
            match kind {
                tar::EntryType::Directory => {
                    let at = dest.join(&rel);
                    match std::fs::create_dir(&at) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && std::fs::symlink_metadata(&at)?.is_dir() => {}
                        Err(e) => return Err(relabel(e, &format!("creating {}", rel.display()))),
                    }
                    // Applied at the end: a read-only directory still takes its entries.
                    dirs.push((at, mode));
                    continue;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => stats.bytes += entry.size(),
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().map(|t| t.len()).unwrap_or(0);
                    if target == 0 || target > MAX_PATH {
                        return Err(invalid(format!("archive entry {}: a link's target must be 1 to {MAX_PATH} bytes", rel.display())));
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "archive entry {} is a {}: only files, directories and symbolic links are unpacked",
                        rel.display(),
                        kind_name(other)
                    )))
                }
            }
            entry.set_preserve_permissions(false);
            entry.set_mask(0o7000);
            entry.set_preserve_mtime(true);
            entry.set_unpack_xattrs(false);
            if !entry.unpack_in(dest).map_err(|e| relabel(e, &format!("unpacking {}", rel.display())))? {
                return Err(invalid(format!("archive entry {} lies outside the target", rel.display())));
            }
        }
    }
    // The end-of-archive marker: only padding may follow, and the input must end cleanly.
    let mut rest = ar.into_inner().take(MAX_TRAILING + 1);
    let trailing = io::copy(&mut rest, &mut io::sink())?;
    if trailing > MAX_TRAILING {
        return Err(invalid(format!("more than {MAX_TRAILING} bytes follow the archive's end")));
    }
    // Deepest first, so a read-only parent does not stop its children's.
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (at, mode) in dirs {
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(stats)
}

fn kind_name(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        _ => "entry of an unsupported type",
    }
}

/// An error from the tar crate with what was being done. Its own refusals (a path outside
/// the target, a malformed header) come as `Other`: they are the archive's fault.
fn relabel(e: io::Error, what: &str) -> io::Error {
    let kind = match e.kind() {
        io::ErrorKind::Other | io::ErrorKind::UnexpectedEof => io::ErrorKind::InvalidData,
        k => k,
    };
    io::Error::new(kind, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"hello").unwrap();
        std::fs::write(root.join("top"), vec![7u8; 100_000]).unwrap();
        std::fs::set_permissions(root.join("top"), std::fs::Permissions::from_mode(0o750)).unwrap();
        symlink("a/b/f", root.join("link")).unwrap();
        symlink("/etc/passwd", root.join("abs")).unwrap();
    }

    #[test]
    fn a_tree_round_trips_with_links_kept_as_links() {
        let t = tempfile::tempdir().unwrap();
        tree(&t.path().join("src"));
        let mut tar = Vec::new();
        let s = pack(&t.path().join("src"), &mut tar).unwrap();
        assert_eq!((s.entries, s.bytes), (6, 100_005));
        let mut again = Vec::new();
        pack(&t.path().join("src"), &mut again).unwrap();
        assert!(tar == again, "packing is not stable");
        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let u = unpack(&tar[..], &dest).unwrap();
        assert_eq!(u.entries, 6);
        assert_eq!(std::fs::read(dest.join("a/b/f")).unwrap(), b"hello");
        assert_eq!(std::fs::read_link(dest.join("link")).unwrap(), Path::new("a/b/f"));
        assert_eq!(std::fs::read_link(dest.join("abs")).unwrap(), Path::new("/etc/passwd"));
        assert_eq!(std::fs::metadata(dest.join("top")).unwrap().mode() & 0o777, 0o750);
    }

    fn one(name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        // Written raw: the builder itself refuses `..` and absolute names.
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn hostile_archives_are_refused_and_nothing_escapes() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        for (name, what) in [("../escape", "'..'"), ("/etc/evil", "absolute"), ("a/../../x", "'..'")] {
            let e = unpack(&one(name, tar::EntryType::Regular, b"x", None)[..], &dest).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}: {e}");
            assert!(e.to_string().contains(what), "{name}: {e}");
        }
        assert!(!t.path().join("escape").exists());
        // A link out, then a file through it.
        let mut both = one("out", tar::EntryType::Symlink, b"", Some(t.path().to_str().unwrap()));
        both.truncate(both.len() - 1024);
        both.extend(one("out/planted", tar::EntryType::Regular, b"x", None));
        let e = unpack(&both[..], &dest).unwrap_err();
        assert!(e.to_string().contains("goes through the link"), "{e}");
        assert!(!t.path().join("planted").exists());
        // Devices and hard links.
        for kind in [tar::EntryType::Char, tar::EntryType::Link, tar::EntryType::Fifo] {
            let e = unpack(&one("dev", kind, b"", Some("top"))[..], &dest).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        }
        // A header that claims more than follows.
        let mut h = tar::Header::new_gnu();
        h.set_path("huge").unwrap();
        h.set_size(1 << 40);
        h.set_cksum();
        let mut huge = h.as_bytes().to_vec();
        huge.extend(vec![0u8; 4096]);
        let dest2 = t.path().join("dest2");
        std::fs::create_dir(&dest2).unwrap();
        let e = unpack(&huge[..], &dest2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Junk after the end.
        let mut junk = one("ok", tar::EntryType::Regular, b"x", None);
        junk.extend(vec![1u8; (MAX_TRAILING + 1) as usize]);
        let dest3 = t.path().join("dest3");
        std::fs::create_dir(&dest3).unwrap();
        assert!(unpack(&junk[..], &dest3).is_err());
    }
}
