//! Extracting zip code artifacts (see the parent module).
//!
//! Every entry is written through a [`beneath::Dir`] rooted at the destination, so no
//! path is resolved through a symbolic link on the host: checking names and link targets
//! as strings is not enough, since links made by earlier entries (`a -> .`, `a/b -> ..`)
//! change what a later, innocent-looking name (`a/b/a/b/x`) resolves to. Links are
//! extracted as links with any target (the build copies them into the guest as links),
//! and an entry that would pass through one, replace an earlier entry, or be a device,
//! FIFO or socket is refused. Errors name the entry inside the archive and never a host
//! path: tenants read them.

use super::{ArtifactError, Limits};
use crate::beneath::{self, Kind};
use crate::RootfsError;
use rustix::io::Errno;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Longest symbolic link target extracted (Linux's `PATH_MAX`, less the NUL).
pub const MAX_LINK_TARGET: usize = 4095;

/// Bits kept from an entry's mode: no setuid, setgid or sticky bit, no write for group or
/// others (the build copies files with these modes into the guest).
const MODE_MASK: u32 = 0o755;

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

fn bad(entry: &str, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::BadEntry { entry: entry.to_owned(), reason: reason.into() }
}

/// `e`, from creating `entry`, in the tenant's terms.
fn entry_error(entry: &str, e: std::io::Error) -> ArtifactError {
    let reason = match beneath::errno(&e) {
        Some(Errno::LOOP) => {
            "it is or passes through a symbolic link an earlier entry made, and nothing is extracted through a link; \
             put the entry at its real path"
        }
        Some(Errno::EXIST) => "an earlier entry already created this path; remove the duplicate",
        Some(Errno::NOTDIR) => "an earlier entry made this path, or a directory on it, a file; remove the duplicate",
        Some(Errno::NAMETOOLONG) => "its name is too long; shorten it",
        _ => return ArtifactError::Io(RootfsError::Io { what: format!("extracting archive entry {entry:?} failed"), source: e }),
    };
    bad(entry, reason)
}

/// Extracts `zip` into the new directory `dest` (which must not exist) and returns the
/// bytes written. On any error nothing of `dest` remains.
///
/// # Errors
/// [`ArtifactError::Corrupt`] for an unreadable archive, [`ArtifactError::TooLarge`]
/// beyond `limits`, [`ArtifactError::Escape`] and [`ArtifactError::BadEntry`] for
/// refused entries, [`ArtifactError::NoDockerfile`] without a regular `Dockerfile` at
/// the root.
pub fn extract_zip(zip: &Path, dest: &Path, limits: Limits) -> Result<u64, ArtifactError> {
    let file = std::fs::File::open(zip).map_err(|e| RootfsError::Io { what: "open the code artifact".into(), source: e })?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| ArtifactError::Corrupt(e.to_string()))?;
    if archive.len() > limits.max_entries {
        return Err(ArtifactError::TooLarge(format!("{} entries; the limit is {}", archive.len(), limits.max_entries)));
    }
    std::fs::create_dir(dest).map_err(|e| RootfsError::Io { what: "create the extraction directory".into(), source: e })?;
    let result = beneath::Dir::open(dest)
        .map_err(|e| ArtifactError::Io(RootfsError::Io { what: "open the extraction directory".into(), source: e }))
        .and_then(|root| extract_entries(&mut archive, &root, limits));
    if result.is_err() {
        // `remove_dir_all` never follows the links it removes.
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn extract_entries(archive: &mut zip::ZipArchive<std::fs::File>, root: &beneath::Dir, limits: Limits) -> Result<u64, ArtifactError> {
    let mut written = 0u64;
    let mut has_dockerfile = false;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| ArtifactError::Corrupt(e.to_string()))?;
        let name = entry.name().to_owned();
        if name.contains('\0') {
            return Err(bad(&name, "its name contains a NUL byte; rename it"));
        }
        if name.contains('\\') {
            return Err(bad(&name, "its name contains a backslash, which zip tools read differently; use `/` between directories"));
        }
        let rel = safe_relative(&name).ok_or_else(|| ArtifactError::Escape(name.clone()))?;
        // Only the type bits matter here; archives made elsewhere may have none.
        let kind = entry.unix_mode().filter(|m| m & 0o170_000 != 0).map(Kind::from_mode).unwrap_or(Kind::File);
        if kind.is_special() {
            return Err(bad(
                &name,
                format!("its mode says it is {}; archives may hold only files, directories and symbolic links", kind.describe()),
            ));
        }
        let kind = match (entry.is_dir(), kind) {
            (true, Kind::Symlink) => return Err(bad(&name, "its name ends with `/` but its mode says it is a symbolic link")),
            (true, _) => Kind::Dir,
            (false, k) => k,
        };
        if rel.as_os_str().is_empty() {
            if kind == Kind::Dir {
                continue;
            }
            return Err(bad(&name, "it names the archive's root; give it a file name"));
        }
        let is_dockerfile = rel == Path::new("Dockerfile");
        match kind {
            Kind::Dir => {
                root.create_dir_all(&rel).map_err(|e| entry_error(&name, e))?;
            }
            Kind::Symlink => {
                if is_dockerfile {
                    return Err(bad(&name, "the Dockerfile must be a regular file, not a symbolic link"));
                }
                let mut target = Vec::new();
                (&mut entry).take(MAX_LINK_TARGET as u64 + 1).read_to_end(&mut target).map_err(|e| entry_error(&name, e))?;
                if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0) {
                    return Err(bad(&name, format!("its link target must be 1 to {MAX_LINK_TARGET} bytes, without NUL")));
                }
                make_parent(root, &rel, &name)?;
                root.symlink(Path::new(OsStr::from_bytes(&target)), &rel).map_err(|e| entry_error(&name, e))?;
            }
            _ => {
                make_parent(root, &rel, &name)?;
                let mut f = root.create_file(&rel, 0o600).map_err(|e| entry_error(&name, e))?;
                let budget = limits.max_bytes - written;
                let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut f).map_err(|e| entry_error(&name, e))?;
                if n > budget {
                    return Err(ArtifactError::TooLarge(format!("more than {} bytes uncompressed", limits.max_bytes)));
                }
                written += n;
                let mode = entry.unix_mode().map_or(0o644, |m| m & MODE_MASK);
                f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| entry_error(&name, e))?;
                has_dockerfile |= is_dockerfile;
            }
        }
    }
    if !has_dockerfile {
        return Err(ArtifactError::NoDockerfile);
    }
    Ok(written)
}

/// Creates the directories above `rel` (beneath `root`, through no link).
fn make_parent(root: &beneath::Dir, rel: &Path, name: &str) -> Result<(), ArtifactError> {
    if let Some(parent) = rel.parent() {
        root.create_dir_all(parent).map_err(|e| entry_error(name, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
