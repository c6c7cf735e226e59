//! Code artifacts: the zip (or directory) a build starts from, with its `Dockerfile` at the
//! root. Archives come from users, so extraction trusts nothing: entry names are checked
//! (no absolute paths, no `..`), symbolic links may not point outside the tree, the number
//! of entries and the bytes actually written are capped (declared sizes can lie: a zip bomb
//! is stopped by what it writes, not what it claims), and a failure removes what was
//! extracted.

use crate::{io, RootfsError};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Limits on one artifact.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes written in all.
    pub max_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: 1 << 30, max_entries: 100_000 }
    }
}

/// Why an artifact was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Not readable as a zip.
    #[error("{path} is not a zip archive: {reason}")]
    NotZip {
        /// The file.
        path: PathBuf,
        /// The reader's complaint.
        reason: String,
    },
    /// An entry would land outside the extraction directory.
    #[error("archive entry {0:?} points outside the archive (absolute path, `..` or a symlink escaping it)")]
    Escape(String),
    /// Too big, or too many entries.
    #[error("archive exceeds its limit: {0}")]
    TooLarge(String),
    /// No Dockerfile at the root.
    #[error("the code artifact has no Dockerfile at its root")]
    NoDockerfile,
    /// A URI scheme Hearth cannot fetch.
    #[error("unsupported code artifact location {0:?}: use a local path or a file:// URI")]
    Scheme(String),
    /// File trouble.
    #[error(transparent)]
    Io(#[from] RootfsError),
}

/// The local file or directory a code artifact location names (`/path`, `./path`,
/// `file:///path`).
pub fn locate(uri: &str) -> Result<PathBuf, ArtifactError> {
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if uri.contains("://") {
        return Err(ArtifactError::Scheme(uri.to_owned()));
    }
    Ok(PathBuf::from(uri))
}

/// `name` as a relative path with no `..`, root or prefix components.
fn safe_relative(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// True when a symlink at `link` (relative to the root) with `target` stays inside.
fn link_stays_inside(link: &Path, target: &str) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in Path::new(target).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Extracts `zip` into the new directory `dest` (which must not exist). On any error
/// nothing of `dest` remains.
pub fn extract_zip(zip: &Path, dest: &Path, limits: Limits) -> Result<u64, ArtifactError> {
    let file = std::fs::File::open(zip).map_err(|e| RootfsError::Io { what: format!("open {}", zip.display()), source: e })?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| ArtifactError::NotZip { path: zip.to_path_buf(), reason: e.to_string() })?;
    if archive.len() > limits.max_entries {
        return Err(ArtifactError::TooLarge(format!("{} entries; the limit is {}", archive.len(), limits.max_entries)));
    }
    std::fs::create_dir(dest).map_err(io(format!("create {}", dest.display())))?;
    let result = extract_entries(&mut archive, dest, limits);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn extract_entries(archive: &mut zip::ZipArchive<std::fs::File>, dest: &Path, limits: Limits) -> Result<u64, ArtifactError> {
    let mut written = 0u64;
    let mut has_dockerfile = false;
    for i in 0..archive.len() {
        let mut entry =
            archive.by_index(i).map_err(|e| ArtifactError::NotZip { path: dest.to_path_buf(), reason: e.to_string() })?;
        let name = entry.name().to_owned();
        let rel = safe_relative(&name).ok_or_else(|| ArtifactError::Escape(name.clone()))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let out = dest.join(&rel);
        if rel == Path::new("Dockerfile") && !entry.is_dir() {
            has_dockerfile = true;
        }
        if entry.is_dir() {
            std::fs::create_dir_all(&out).map_err(io(format!("create {}", out.display())))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        if entry.is_symlink() {
            let mut target = String::new();
            (&mut entry).take(4096).read_to_string(&mut target).map_err(|_| ArtifactError::Escape(name.clone()))?;
            if !link_stays_inside(&rel, &target) {
                return Err(ArtifactError::Escape(name));
            }
            std::os::unix::fs::symlink(&target, &out).map_err(io(format!("link {}", out.display())))?;
            continue;
        }
        let budget = limits.max_bytes - written;
        let mut f = std::fs::File::create(&out).map_err(io(format!("create {}", out.display())))?;
        let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut f).map_err(io(format!("extract {name}")))?;
        if n > budget {
            return Err(ArtifactError::TooLarge(format!("more than {} bytes uncompressed", limits.max_bytes)));
        }
        written += n;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode & 0o755));
        }
    }
    if !has_dockerfile {
        return Err(ArtifactError::NoDockerfile);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn make_zip(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        for (name, data) in entries {
            w.start_file(*name, SimpleFileOptions::default()).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        f
    }

    #[test]
    fn a_good_archive_extracts() {
        let z = make_zip(&[("Dockerfile", b"FROM busybox\n"), ("src/app.py", b"print(1)\n")]);
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ctx");
        assert_eq!(extract_zip(z.path(), &out, Limits::default()).unwrap(), 22);
        assert_eq!(std::fs::read(out.join("src/app.py")).unwrap(), b"print(1)\n");
    }

    #[test]
    fn traversal_is_refused_and_nothing_is_left() {
        for bad in ["../evil", "/etc/passwd", "a/../../evil"] {
            let z = make_zip(&[("Dockerfile", b"FROM busybox\n"), (bad, b"x")]);
            let d = tempfile::tempdir().unwrap();
            let out = d.path().join("ctx");
            let e = extract_zip(z.path(), &out, Limits::default()).unwrap_err();
            assert!(matches!(e, ArtifactError::Escape(_)), "{bad}: {e}");
            assert!(!out.exists(), "{bad}: partial extraction left behind");
        }
    }

    #[test]
    fn escaping_symlinks_are_refused() {
        assert!(link_stays_inside(Path::new("a/b"), "../c"));
        assert!(!link_stays_inside(Path::new("a/b"), "../../c"));
        assert!(!link_stays_inside(Path::new("a"), "/etc/passwd"));
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        w.start_file("Dockerfile", SimpleFileOptions::default()).unwrap();
        w.write_all(b"FROM busybox\n").unwrap();
        w.add_symlink("link", "../../etc/shadow", SimpleFileOptions::default()).unwrap();
        w.finish().unwrap();
        let d = tempfile::tempdir().unwrap();
        let e = extract_zip(f.path(), &d.path().join("ctx"), Limits::default()).unwrap_err();
        assert!(matches!(e, ArtifactError::Escape(_)), "{e}");
    }

    #[test]
    fn bombs_and_missing_dockerfiles_are_refused() {
        // 64 MiB of zeros compresses to a few KiB; the limit is on what is written.
        let zeros = vec![0u8; 64 << 20];
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        w.start_file("Dockerfile", SimpleFileOptions::default()).unwrap();
        w.write_all(b"FROM busybox\n").unwrap();
        w.start_file("bomb", SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated)).unwrap();
        w.write_all(&zeros).unwrap();
        w.finish().unwrap();
        assert!(std::fs::metadata(f.path()).unwrap().len() < 1 << 20);
        let d = tempfile::tempdir().unwrap();
        let e = extract_zip(f.path(), &d.path().join("ctx"), Limits { max_bytes: 16 << 20, max_entries: 10 }).unwrap_err();
        assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");

        let z = make_zip(&[("app.py", b"x")]);
        let e = extract_zip(z.path(), &d.path().join("ctx2"), Limits::default()).unwrap_err();
        assert!(matches!(e, ArtifactError::NoDockerfile), "{e}");
        let e = extract_zip(z.path(), &d.path().join("ctx3"), Limits { max_bytes: 1 << 20, max_entries: 0 }).unwrap_err();
        assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");
    }

    #[test]
    fn locations() {
        assert_eq!(locate("file:///tmp/a.zip").unwrap(), PathBuf::from("/tmp/a.zip"));
        assert_eq!(locate("./a.zip").unwrap(), PathBuf::from("./a.zip"));
        assert!(matches!(locate("s3://bucket/a.zip"), Err(ArtifactError::Scheme(_))));
    }
}
