//! Image versions on disk: `$HEARTH_HOME/images/<name>/v<N>/` holds `image.json` (the
//! record: state, base, config, timestamps), `build.log`, and, once SUCCESSFUL, the
//! template `snapshot/` that microVMs launch from.

use crate::base::Base;
use crate::build::ImageConfig;
use crate::{io, RootfsError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use hearth_proto::image::ImageVersionState;

/// The record of one image version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Image name.
    pub name: String,
    /// Version number (1, 2, …).
    pub version: u32,
    /// State.
    pub state: ImageVersionState,
    /// Base image name.
    pub base: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Runtime configuration (when built).
    pub config: Option<ImageConfig>,
    /// Milliseconds since the epoch when the build started.
    pub created_unix_ms: u64,
}

/// Checks an image name against the one rule ([`hearth_proto::image::check_name`]: the
/// model's `ImageName`, matched whole), shared with the API.
pub fn check_name(name: &str) -> Result<(), RootfsError> {
    hearth_proto::image::check_name(name).map_err(|e| RootfsError::Invalid(e.to_string()))
}

/// The directory of all versions of `name`.
pub fn image_dir(home: &Path, name: &str) -> PathBuf {
    home.join("images").join(name)
}

/// Directory of one version.
pub fn version_dir(home: &Path, name: &str, version: u32) -> PathBuf {
    image_dir(home, name).join(format!("v{version}"))
}

/// All version records of `name`, oldest first.
pub fn versions(home: &Path, name: &str) -> Vec<VersionRecord> {
    let mut out: Vec<VersionRecord> = std::fs::read_dir(image_dir(home, name))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("image.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by_key(|r| r.version);
    out
}

/// Names of all images.
pub fn names(home: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(home.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Starts a new version: creates its directory with a PENDING record.
pub fn begin(home: &Path, name: &str, base: Base) -> Result<VersionRecord, RootfsError> {
    check_name(name)?;
    let dir = image_dir(home, name);
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let mut version = versions(home, name).last().map_or(1, |r| r.version + 1);
    // Another build may race us for the number: the directory creation decides.
    loop {
        match std::fs::create_dir(version_dir(home, name, version)) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => version += 1,
            Err(e) => return Err(RootfsError::Io { what: "create the version directory".into(), source: e }),
        }
    }
    let rec = VersionRecord {
        name: name.to_owned(),
        version,
        state: ImageVersionState::Pending,
        base: base.name().into(),
        reason: None,
        config: None,
        created_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    };
    save(home, &rec)?;
    Ok(rec)
}

/// Writes a record (atomically).
pub fn save(home: &Path, rec: &VersionRecord) -> Result<(), RootfsError> {
    let dir = version_dir(home, &rec.name, rec.version);
    let tmp = dir.join(".image.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec).unwrap_or_default()).map_err(io("write image.json"))?;
    std::fs::rename(&tmp, dir.join("image.json")).map_err(io("install image.json"))
}

/// The newest SUCCESSFUL version of `name`.
pub fn latest(home: &Path, name: &str) -> Option<VersionRecord> {
    versions(home, name).into_iter().rev().find(|r| r.state == ImageVersionState::Successful)
}

/// Splits `NAME` or `NAME:vN` ([`hearth_proto::image::ImageRef`]); the name is checked.
pub fn parse_ref(image: &str) -> Result<(String, Option<u32>), RootfsError> {
    let r: hearth_proto::image::ImageRef =
        image.parse().map_err(|e: hearth_proto::image::ImageRefError| RootfsError::Invalid(e.to_string()))?;
    Ok((r.name, r.version))
}

/// The SUCCESSFUL version `image` (`NAME` for the newest, or `NAME:vN`) names.
pub fn resolve(home: &Path, image: &str) -> Result<VersionRecord, RootfsError> {
    let (name, version) = parse_ref(image)?;
    let rec = match version {
        Some(v) => versions(home, &name).into_iter().find(|r| r.version == v && r.state == ImageVersionState::Successful),
        None => latest(home, &name),
    };
    rec.ok_or_else(|| RootfsError::Invalid(format!("no successfully built image {image} (see `hearth images local ls`)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_number_up_and_latest_skips_failures() {
        let home = tempfile::tempdir().unwrap();
        let mut a = begin(home.path(), "app", Base::Busybox).unwrap();
        a.state = ImageVersionState::Successful;
        save(home.path(), &a).unwrap();
        let mut b = begin(home.path(), "app", Base::Busybox).unwrap();
        b.state = ImageVersionState::Failed;
        save(home.path(), &b).unwrap();
        assert_eq!((a.version, b.version), (1, 2));
        assert_eq!(latest(home.path(), "app").unwrap().version, 1);
        assert_eq!(names(home.path()), vec!["app"]);
        assert!(begin(home.path(), "../x", Base::Busybox).is_err());
        // One rule with the API: no dots.
        assert!(begin(home.path(), "web.app", Base::Busybox).is_err());
        assert_eq!(parse_ref("app:v2").unwrap(), ("app".to_owned(), Some(2)));
        assert!(parse_ref("../x:v1").is_err() && parse_ref("app:vx").is_err());
    }
}
