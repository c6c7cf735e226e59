//! A directory handle whose paths stay beneath it and never pass through a symbolic link.
//!
//! Tenants control what lands in a build context: the entries of a code zip, and so the
//! files COPY reads. A path checked as a string and then used with `std::fs` is resolved
//! again by the kernel, following every link on the way, including links created a moment
//! earlier by the same archive: `a -> .`, `a/b -> ..`, then `a/b/a/b/x` looks inside and
//! writes outside. So no path from a tenant is ever handed to `std::fs` here. Every
//! operation of [`Dir`] resolves its relative path with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: the kernel itself
//! refuses a path that would leave the directory (`EXDEV`) or that meets a symbolic link
//! on the way (`ELOOP`), atomically, with no window between check and use. The last
//! component is never followed either: files are created with `O_EXCL | O_NOFOLLOW`,
//! links with `symlinkat(2)`, and [`Dir::metadata`] describes a link, not what it names.
//!
//! Links are still allowed to *exist* beneath the directory (a context may hold them, the
//! guest recreates them); they are only never resolved on the host.
//!
//! This is `rustix` rather than `cap-std`: `cap-std` would resolve beneath the directory
//! too, but it follows links that stay inside (by design, for sandboxed programs), while
//! here any link on the way is refused; `openat2` says that in one flag. Linux 5.6 or
//! later is needed.
//!
//! ```
//! let tmp = tempfile::tempdir().unwrap();
//! let root = hearth_image::beneath::Dir::open(tmp.path()).unwrap();
//! root.create_dir_all("a/b".as_ref()).unwrap();
//! root.symlink("/etc".as_ref(), "a/link".as_ref()).unwrap();
//! // Nothing is ever written through the link.
//! assert!(root.create_file("a/link/passwd".as_ref(), 0o644).is_err());
//! ```

use rustix::fs::{self as rfs, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path};

/// How every path is resolved: inside the directory, through no link of any kind.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Times a resolution is retried when the kernel saw a concurrent rename (`EAGAIN`).
const RETRIES: usize = 16;

/// What a path names, not following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (its target is never resolved here).
    Symlink,
    /// A FIFO.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
}

impl Kind {
    /// The kind a `st_mode` says.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & 0o170_000 {
            0o040_000 => Kind::Dir,
            0o120_000 => Kind::Symlink,
            0o010_000 => Kind::Fifo,
            0o140_000 => Kind::Socket,
            0o020_000 => Kind::CharDevice,
            0o060_000 => Kind::BlockDevice,
            _ => Kind::File,
        }
    }

    /// True for FIFOs, sockets and devices: nothing a build copies or an archive holds.
    pub fn is_special(self) -> bool {
        !matches!(self, Kind::File | Kind::Dir | Kind::Symlink)
    }

    /// The kind in words ("a FIFO").
    pub fn describe(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device",
            Kind::BlockDevice => "a block device",
        }
    }
}

/// What [`Dir::metadata`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    /// What the path names.
    pub kind: Kind,
    /// The whole `st_mode` (type and permission bits).
    pub mode: u32,
    /// Size in bytes.
    pub len: u64,
}

/// An open directory; every path given to it is relative to it and resolved beneath it
/// (see the module docs).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// The components of `rel`, refused when it is absolute or has `..`.
fn components(rel: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "the path must be relative, without `..`")),
        }
    }
    Ok(out)
}

/// `rel` as a path for the kernel: relative, `.` for the directory itself.
fn checked(rel: &Path) -> io::Result<&Path> {
    if components(rel)?.is_empty() {
        Ok(Path::new("."))
    } else {
        Ok(rel)
    }
}

/// `rel` split into its parent (possibly empty) and last component.
fn split(rel: &Path) -> io::Result<(std::path::PathBuf, &std::ffi::OsStr)> {
    let mut parts = components(rel)?;
    let last = parts.pop().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names the directory itself"))?;
    Ok((parts.iter().collect(), last))
}

fn errno_to_io(e: Errno) -> io::Error {
    if e == Errno::NOSYS {
        return io::Error::new(io::ErrorKind::Unsupported, "openat2 is unavailable: Hearth needs Linux 5.6 or later");
    }
    e.into()
}

impl Dir {
    /// Opens the directory at `path`. The path itself is the caller's (trusted, and
    /// resolved as usual); only paths below it are resolved beneath.
    ///
    /// # Errors
    /// When `path` is not an openable directory.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rfs::open(path, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Dir { fd })
    }

    fn openat2(&self, rel: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let rel = checked(rel)?;
        let mut tries = 0;
        loop {
            match rfs::openat2(&self.fd, rel, flags | OFlags::CLOEXEC, Mode::from_raw_mode(mode), RESOLVE) {
                Err(Errno::AGAIN) if tries < RETRIES => tries += 1,
                r => return r.map_err(errno_to_io),
            }
        }
    }

    /// The directory `parent`, for the `*at` calls that act on one name in it. Without
    /// `O_NOFOLLOW`, a parent that is a link is refused (`ELOOP`) by `RESOLVE_NO_SYMLINKS`
    /// (with it and `O_PATH`, the link itself would be opened).
    fn parent(&self, parent: &Path) -> io::Result<OwnedFd> {
        self.openat2(parent, OFlags::DIRECTORY | OFlags::PATH, 0)
    }

    /// Opens the directory `rel` beneath this one. (No `O_NOFOLLOW`: with `O_DIRECTORY` it
    /// would turn a trailing link into `ENOTDIR`; `RESOLVE_NO_SYMLINKS` refuses it with
    /// `ELOOP`, like any other link on the way.)
    ///
    /// # Errors
    /// `ELOOP` when `rel` is or passes through a link, `ENOTDIR` when it is no directory.
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        Ok(Dir { fd: self.openat2(rel, OFlags::DIRECTORY | OFlags::RDONLY, 0)? })
    }

    /// Creates `rel` and its missing parents (mode 0755), and opens it. Directories that
    /// already exist are used; a link or a file on the way is an error.
    ///
    /// # Errors
    /// `ELOOP` when a component is a link, `ENOTDIR` when it is a file, and I/O errors.
    pub fn create_dir_all(&self, rel: &Path) -> io::Result<Dir> {
        let mut cur = Dir { fd: self.fd.try_clone()? };
        for c in components(rel)? {
            match rfs::mkdirat(&cur.fd, c, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            cur = cur.open_dir(Path::new(c))?;
        }
        Ok(cur)
    }

    /// Creates the regular file `rel` (which must not exist, not even as a link) with
    /// `mode` (less the umask), open for writing.
    ///
    /// # Errors
    /// `EEXIST` when something is there already, `ELOOP` when a parent is a link,
    /// `ENOENT` when a parent is missing.
    pub fn create_file(&self, rel: &Path, mode: u32) -> io::Result<File> {
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::NOCTTY;
        Ok(File::from(self.openat2(rel, flags, mode & 0o777)?))
    }

    /// Creates the symbolic link `rel` pointing at `target` (any target: it is never
    /// followed here).
    ///
    /// # Errors
    /// `EEXIST` when something is there already, `ELOOP` when a parent is a link.
    pub fn symlink(&self, target: &Path, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let dir = self.parent(&parent)?;
        Ok(rfs::symlinkat(target, &dir, name)?)
    }

    /// Opens the regular file `rel` for reading. FIFOs and devices are refused without
    /// blocking (the open is non-blocking, and the kind is checked before any read).
    ///
    /// # Errors
    /// `ELOOP` when `rel` is or passes through a link, `InvalidInput` when it is not a
    /// regular file.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.openat2(rel, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY, 0)?;
        let kind = Kind::from_mode(rfs::fstat(&fd)?.st_mode);
        if kind != Kind::File {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {}, not a regular file", kind.describe())));
        }
        Ok(File::from(fd))
    }

    /// What `rel` names, not following it when it is a link (`lstat`).
    ///
    /// # Errors
    /// `ELOOP` when a parent of `rel` is a link, `ENOENT` when it does not exist.
    pub fn metadata(&self, rel: &Path) -> io::Result<Metadata> {
        // With O_PATH | O_NOFOLLOW a trailing link opens as itself (openat2(2)).
        let fd = self.openat2(rel, OFlags::PATH | OFlags::NOFOLLOW, 0)?;
        let st = rfs::fstat(&fd)?;
        Ok(Metadata { kind: Kind::from_mode(st.st_mode), mode: st.st_mode, len: st.st_size.max(0) as u64 })
    }

    /// The target of the link `rel`, as stored (never resolved).
    ///
    /// # Errors
    /// `EINVAL` when `rel` is not a link, `ELOOP` when a parent is a link.
    pub fn read_link(&self, rel: &Path) -> io::Result<OsString> {
        let (parent, name) = split(rel)?;
        let dir = self.parent(&parent)?;
        let target = rfs::readlinkat(&dir, name, Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// The names in the directory `rel` (without `.` and `..`), sorted.
    ///
    /// # Errors
    /// `ELOOP` when `rel` is or passes through a link, `ENOTDIR` when it is no directory.
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<OsString>> {
        let fd = self.openat2(rel, OFlags::DIRECTORY | OFlags::RDONLY, 0)?;
        let mut names = Vec::new();
        for e in rfs::Dir::new(fd)? {
            let name = e?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name));
            }
        }
        names.sort();
        Ok(names)
    }
}

/// True when `e` is the kernel refusing a path for meeting a link on the way (`ELOOP`).
pub fn is_link_refusal(e: &io::Error) -> bool {
    Errno::from_io_error(e) == Some(Errno::LOOP)
}

/// The `errno` of `e`, when it has one.
pub(crate) fn errno(e: &io::Error) -> Option<Errno> {
    Errno::from_io_error(e)
}

impl From<Dir> for OwnedFd {
    fn from(d: Dir) -> OwnedFd {
        d.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("root")).unwrap();
        std::fs::create_dir(t.path().join("outside")).unwrap();
        let d = Dir::open(&t.path().join("root")).unwrap();
        (t, d)
    }

    #[test]
    fn nothing_resolves_through_a_link() {
        let (t, d) = setup();
        let outside = t.path().join("outside");
        d.symlink(&outside, "abs".as_ref()).unwrap();
        d.symlink("..".as_ref(), "up".as_ref()).unwrap();
        d.symlink(".".as_ref(), "here".as_ref()).unwrap();
        for p in ["abs/x", "up/outside/x", "here/x"] {
            let e = d.create_file(p.as_ref(), 0o644).unwrap_err();
            assert!(is_link_refusal(&e), "{p}: {e}");
            assert!(is_link_refusal(&d.create_dir_all(p.as_ref()).unwrap_err()), "{p}");
            assert!(is_link_refusal(&d.metadata(p.as_ref()).unwrap_err()), "{p}");
        }
        // The link itself is described, not followed, and cannot be opened or replaced.
        assert_eq!(d.metadata("abs".as_ref()).unwrap().kind, Kind::Symlink);
        assert_eq!(d.read_link("abs".as_ref()).unwrap(), outside.as_os_str());
        assert!(is_link_refusal(&d.open_file("abs".as_ref()).unwrap_err()));
        assert!(is_link_refusal(&d.open_dir("here".as_ref()).unwrap_err()));
        assert_eq!(errno(&d.create_file("abs".as_ref(), 0o644).unwrap_err()), Some(Errno::EXIST));
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn paths_that_leave_are_refused() {
        let (_t, d) = setup();
        for p in ["../outside/x", "/tmp/x", "a/../../x"] {
            assert_eq!(d.create_file(p.as_ref(), 0o644).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{p}");
        }
    }

    #[test]
    fn files_dirs_and_listing() {
        let (_t, d) = setup();
        d.create_dir_all("a/b".as_ref()).unwrap();
        d.create_dir_all("a/b".as_ref()).unwrap();
        std::io::Write::write_all(&mut d.create_file("a/b/f".as_ref(), 0o600).unwrap(), b"hi").unwrap();
        assert_eq!(errno(&d.create_file("a/b/f".as_ref(), 0o600).unwrap_err()), Some(Errno::EXIST));
        assert_eq!(errno(&d.create_dir_all("a/b/f/c".as_ref()).unwrap_err()), Some(Errno::NOTDIR));
        let m = d.metadata("a/b/f".as_ref()).unwrap();
        assert_eq!((m.kind, m.len), (Kind::File, 2));
        assert_eq!(std::io::read_to_string(d.open_file("a/b/f".as_ref()).unwrap()).unwrap(), "hi");
        assert_eq!(d.read_dir("a".as_ref()).unwrap(), vec![OsString::from("b")]);
        assert_eq!(d.read_dir("".as_ref()).unwrap(), vec![OsString::from("a")]);
        assert_eq!(d.metadata("".as_ref()).unwrap().kind, Kind::Dir);
        assert_eq!(d.open_file("a".as_ref()).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
