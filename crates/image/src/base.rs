//! Managed base images, built by Hearth and cached by recipe version in
//! `$HEARTH_HOME/rootfs/`: `minimal` (a full static busybox, [`busybox`]) and three Debian
//! bookworm images made by `mmdebstrap` from the host's own mirror ([`debian`]):
//! `debian-bookworm` (minbase and everyday tools), `python` (plus pip and venv) and
//! `nodejs` (plus npm).
//!
//! Every base's root filesystem is [`crate::ext4::DEFAULT_DISK_MIB`] (8 GiB) in a sparse
//! file: free space costs the host nothing. A base is built once, by whichever asks first
//! (`hearth setup`, `hearth base build`, or the first image build on it); a lock file
//! makes a second builder, in this process or another, wait and use the first one's image.

use crate::{io, RootfsError};
use std::path::{Path, PathBuf};

// The `minimal` base: busybox built from Debian's source with every applet.
pub(crate) mod busybox;
// The Debian bases: mmdebstrap of bookworm.
mod debian;

pub use busybox::BUSYBOX_VERSION;
pub use debian::{DEBIAN_PACKAGES, DEBIAN_VERSION, NODE_PACKAGES, NODE_VERSION, PYTHON_PACKAGES, PYTHON_VERSION};

/// The managed base images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Base {
    /// A static busybox with every applet, and nothing else; boots fastest.
    Busybox,
    /// Debian bookworm minbase with everyday tools and python3.
    DebianBookworm,
    /// [`Base::DebianBookworm`] with pip and venv.
    Python,
    /// [`Base::DebianBookworm`] with Node.js and npm.
    Node,
}

impl Base {
    /// Every managed base, in the order lists show them.
    pub const ALL: [Base; 4] = [Base::Busybox, Base::DebianBookworm, Base::Python, Base::Node];

    /// The base's name: in its managed image ARN, `hearth base`, `--base`.
    pub fn name(self) -> &'static str {
        match self {
            Base::Busybox => "minimal",
            Base::DebianBookworm => "debian-bookworm",
            Base::Python => "python",
            Base::Node => "nodejs",
        }
    }

    /// Other names the base answers to (`FromStr`, and a Dockerfile's `FROM`).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Base::Busybox => &["busybox"],
            Base::DebianBookworm => &["debian", "debian:bookworm", "debian:12", "debian:bookworm-slim"],
            Base::Python => &["python3", "python:3.11", "python:3.11-bookworm", "python:3.11-slim", "python:3.11-slim-bookworm"],
            Base::Node => &["node", "node:18", "node:18-bookworm", "node:18-slim", "node:18-bookworm-slim"],
        }
    }

    /// What it holds, in a line (`hearth base ls`, the README's table).
    pub fn describe(self) -> &'static str {
        match self {
            Base::Busybox => "static busybox 1.35 with every applet",
            Base::DebianBookworm => "Debian 12 minbase, python3, curl, ca-certificates, procps, less, nano, vim-tiny, iproute2",
            Base::Python => "debian-bookworm + Python 3.11 pip and venv",
            Base::Node => "debian-bookworm + Node.js 18 and npm",
        }
    }

    /// Whether `from` (a Dockerfile's `FROM`) names this base.
    pub fn is_named(self, from: &str) -> bool {
        from == self.name() || self.aliases().contains(&from)
    }

    /// The image's file name: the recipe's version is part of it, so a new recipe makes
    /// hosts build the image again.
    fn file_name(self) -> String {
        match self {
            Base::Busybox => format!("busybox-v{BUSYBOX_VERSION}.ext4"),
            Base::DebianBookworm => format!("debian-bookworm-v{DEBIAN_VERSION}.ext4"),
            Base::Python => format!("python-v{PYTHON_VERSION}.ext4"),
            Base::Node => format!("nodejs-v{NODE_VERSION}.ext4"),
        }
    }

    /// Where the built image lives.
    pub fn path(self, home: &Path) -> PathBuf {
        home.join("rootfs").join(self.file_name())
    }

    /// Builds the image unless it is already there; returns its path. Blocks while
    /// another builder holds the base's lock, then uses what it built.
    ///
    /// # Errors
    ///
    /// [`RootfsError`]: a tool missing or failing (with the set-up command to run), or the
    /// image file not written.
    pub fn ensure(self, home: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf, RootfsError> {
        let out = self.path(home);
        if out.is_file() {
            return Ok(out);
        }
        let dir = home.join("rootfs");
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let _lock = lock(&dir.join(format!(".{}.lock", self.file_name())), &|| {
            progress(&format!("waiting for another build of the {} base", self.name()))
        })?;
        if out.is_file() {
            return Ok(out);
        }
        match self {
            Base::Busybox => busybox::build(home, hearth_vmm::arch::Arch::X86_64, &out, progress)?,
            Base::DebianBookworm => debian::build(home, &out, DEBIAN_PACKAGES, progress)?,
            Base::Python => debian::build(home, &out, &[DEBIAN_PACKAGES, PYTHON_PACKAGES].concat(), progress)?,
            Base::Node => debian::build(home, &out, &[DEBIAN_PACKAGES, NODE_PACKAGES].concat(), progress)?,
        }
        Ok(out)
    }
}

impl std::str::FromStr for Base {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Base::ALL
            .into_iter()
            .find(|b| b.is_named(s))
            .ok_or_else(|| format!("unknown base image {s:?}; use one of {}", Base::ALL.map(Base::name).join(", ")))
    }
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An exclusive `flock` on `path`, held until dropped (the file descriptor closes).
pub(crate) fn lock(path: &Path, waiting: &dyn Fn()) -> Result<std::fs::File, RootfsError> {
    use rustix::fs::{flock, FlockOperation};
    let f =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(format!("open {}", path.display())))?;
    if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        waiting();
        flock(&f, FlockOperation::LockExclusive)
            .map_err(|e| RootfsError::Io { what: format!("lock {}", path.display()), source: e.into() })?;
    }
    Ok(f)
}

/// A scratch directory beside the images, removed when dropped.
fn scratch(home: &Path) -> Result<tempfile::TempDir, RootfsError> {
    let dir = home.join("rootfs");
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    tempfile::Builder::new().prefix(".build-").tempdir_in(&dir).map_err(io("create build directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_base_has_one_name_and_distinct_aliases() {
        let mut seen = std::collections::BTreeSet::new();
        for b in Base::ALL {
            assert_eq!(b.name().parse::<Base>(), Ok(b));
            assert_eq!(b.to_string(), b.name());
            for n in std::iter::once(b.name()).chain(b.aliases().iter().copied()) {
                assert!(seen.insert(n), "{n} names two bases");
                assert_eq!(n.parse::<Base>(), Ok(b));
            }
        }
        let e = "alpine".parse::<Base>().unwrap_err();
        assert!(e.contains("minimal, debian-bookworm, python, nodejs"), "{e}");
    }

    #[test]
    fn each_recipe_has_its_own_file() {
        let home = Path::new("/h");
        let files: std::collections::BTreeSet<_> = Base::ALL.iter().map(|b| b.path(home)).collect();
        assert_eq!(files.len(), Base::ALL.len());
        assert_eq!(Base::Busybox.path(home), Path::new(&format!("/h/rootfs/busybox-v{BUSYBOX_VERSION}.ext4")));
    }

    #[test]
    fn a_second_locker_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".x.lock");
        let held = lock(&p, &|| panic!("nobody holds it yet")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            let waited = std::cell::Cell::new(false);
            let _l = lock(&p2, &|| waited.set(true)).unwrap();
            tx.send(waited.get()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "the second lock was taken while the first was held");
        drop(held);
        assert!(rx.recv().unwrap(), "the second locker did not say it waited");
        t.join().unwrap();
    }
}
