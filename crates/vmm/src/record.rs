//! `vm.json`: what a VM is made of and where it stands, the record a [`crate::Vm`] holds
//! and a detached VM ([`crate::VmConfig::detached`]) leaves in its run directory, so a
//! later process can find it again ([`crate::Vm::reattach`]) or kill it
//! ([`crate::rundir::kill_unowned_detached`]).
//!
//! It is written right after QEMU starts (a crash during boot still leaves a VM that can
//! be found and killed) and after every change, atomically (temporary file, rename).
//!
//! Versions: 1, written by releases before VM names, has no `version` field; 2 adds it and
//! the configuration's `name`. A reader takes both and refuses a newer version rather
//! than guess at it (a downgraded Hearth leaves such a VM alone instead of misreading it).

use crate::accel::Accel;
use crate::config::VmConfig;
use crate::net::Egress;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file in a run directory.
pub(crate) const FILE: &str = "vm.json";
/// The format this release writes.
pub(crate) const VERSION: u32 = 2;
/// Largest record read (a real one is a few KiB).
const MAX_BYTES: u64 = 1 << 20;

/// What `vm.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    /// The format version ([`VERSION`] once read).
    #[serde(default = "version_1")]
    pub(crate) version: u32,
    /// The VM's id (its run directory's name).
    pub(crate) id: String,
    /// The configuration it was started with (memory, vCPUs, kernel…, for manifests).
    pub(crate) cfg: VmConfig,
    /// The accelerator QEMU runs with.
    pub(crate) accel: Accel,
    /// QEMU's pid.
    pub(crate) pid: u32,
    /// The disk image QEMU writes to, if any (an overlay in the run directory, or a
    /// resumed VM's disk left in its suspend directory).
    pub(crate) disk: Option<PathBuf>,
    /// True when Hearth made that disk (overlay, or a suspended VM's own disk), so a
    /// snapshot may move it. A user's own image is never moved.
    pub(crate) disk_owned: bool,
    /// The VM's network namespace, if it has a network.
    pub(crate) netns: Option<String>,
    /// The current egress policy (changed while the VM runs, hence the lock).
    pub(crate) egress: Mutex<Option<Egress>>,
}

fn version_1() -> u32 {
    1
}

/// A `vm.json` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The file is larger than any record.
    #[error("{0} is larger than {MAX_BYTES} bytes; it is not a VM record")]
    TooLarge(PathBuf),
    /// A newer release wrote it.
    #[error("{path} has format version {found}; this Hearth reads versions up to {VERSION}: upgrade Hearth to take this VM back")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The file is not a record.
    #[error("{0} is not a VM record")]
    Invalid(PathBuf, #[source] serde_json::Error),
}

impl RecordError {
    /// The message with its causes, for errors that carry text only.
    pub(crate) fn chain(&self) -> String {
        let mut msg = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            msg.push_str(&format!(": {c}"));
            cause = c.source();
        }
        msg
    }
}

impl VmRecord {
    /// Reads the record in run directory `dir`, in any version this release understands.
    pub(crate) fn read(dir: &Path) -> Result<VmRecord, RecordError> {
        let path = dir.join(FILE);
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_BYTES + 1).read_to_end(&mut text))
            .map_err(|e| RecordError::Io(path.clone(), e))?;
        if text.len() as u64 > MAX_BYTES {
            return Err(RecordError::TooLarge(path));
        }
        Self::parse(&text).map_err(|e| match e {
            ParseError::Version(found) => RecordError::Version { path: path.clone(), found },
            ParseError::Json(e) => RecordError::Invalid(path.clone(), e),
        })
    }

    fn parse(text: &[u8]) -> Result<VmRecord, ParseError> {
        // The version first: a newer format may not parse as this one at all.
        #[derive(Deserialize)]
        struct Version {
            #[serde(default = "version_1")]
            version: u32,
        }
        let found = serde_json::from_slice::<Version>(text).map_err(ParseError::Json)?.version;
        if !(1..=VERSION).contains(&found) {
            return Err(ParseError::Version(found));
        }
        let mut record: VmRecord = serde_json::from_slice(text).map_err(ParseError::Json)?;
        // Version 1 is version 2 without the fields that default; it is written back as 2.
        record.version = VERSION;
        Ok(record)
    }

    /// Writes the record into `dir`, atomically; only for detached VMs (nothing looks for
    /// the others').
    pub(crate) fn write(&self, dir: &Path) {
        if !self.cfg.detached {
            return;
        }
        let tmp = dir.join(".vm.json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(FILE));
        }
    }

    /// True while the recorded QEMU runs: the pid is alive and its command line names
    /// this VM (so a reused pid is never mistaken for it).
    pub(crate) fn qemu_runs(&self) -> bool {
        crate::qemu::is_vm_process(self.pid, &self.id)
    }

    /// The VM's log span ([`span`]).
    pub(crate) fn span(&self) -> tracing::Span {
        span(&self.id, self.cfg.name.as_deref())
    }

    /// The current egress policy.
    pub(crate) fn egress(&self) -> Option<Egress> {
        self.egress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

enum ParseError {
    Version(u32),
    Json(serde_json::Error),
}

/// The span of VM `id`, named `name` by the caller: log lines made in it carry both, so
/// logs map to the API's microvms. At ERROR level, so it is enabled whenever any line is:
/// a span below the filter's level is disabled, and the warnings inside it would lose
/// the VM's id.
pub(crate) fn span(id: &str, name: Option<&str>) -> tracing::Span {
    let span = tracing::error_span!("vm", id = %id, name = tracing::field::Empty);
    if let Some(name) = name {
        span.record("name", name);
    }
    span
}

/// True when `dir` holds a detached VM whose QEMU still runs.
pub(crate) fn live_detached(dir: &Path) -> bool {
    VmRecord::read(dir).is_ok_and(|r| r.qemu_runs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmRecord {
        let mut cfg = VmConfig::new("/k", "/i");
        cfg.detached = true;
        cfg.name = Some("mvm-0123456789abcdef".into());
        VmRecord {
            version: VERSION,
            id: "vm-0a1b2c3d4e5f".into(),
            cfg,
            accel: Accel::Tcg,
            pid: 42,
            disk: Some("/run/vm-0a1b2c3d4e5f/root.qcow2".into()),
            disk_owned: true,
            netns: Some("hearth-vm-0a1b2c3d4e5f".into()),
            egress: Mutex::new(Some(Egress::none())),
        }
    }

    #[test]
    fn the_current_format_round_trips_with_its_version() {
        let dir = tempfile::tempdir().unwrap();
        record().write(dir.path());
        let text: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(text["version"], VERSION);
        let back = VmRecord::read(dir.path()).unwrap();
        assert_eq!(back.cfg.name.as_deref(), Some("mvm-0123456789abcdef"));
        assert_eq!((back.pid, back.disk_owned, back.egress()), (42, true, Some(Egress::none())));
    }

    #[test]
    fn version_1_without_version_or_name_is_read() {
        // What releases before names wrote: the same fields, no `version`, no `cfg.name`.
        let mut v1 = serde_json::to_value(record()).unwrap();
        v1.as_object_mut().unwrap().remove("version");
        v1["cfg"].as_object_mut().unwrap().remove("name");
        let r = VmRecord::parse(&serde_json::to_vec(&v1).unwrap()).unwrap_or_else(|_| panic!("v1 refused"));
        assert_eq!((r.version, r.id.as_str(), r.cfg.name), (VERSION, "vm-0a1b2c3d4e5f", None));
    }

    #[test]
    fn newer_versions_and_oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut v3 = serde_json::to_value(record()).unwrap();
        v3["version"] = 3.into();
        v3["cfg"] = "reshaped".into();
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&v3).unwrap()).unwrap();
        let e = VmRecord::read(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Version { found: 3, .. }), "{e}");
        assert!(!live_detached(dir.path()));
        std::fs::write(dir.path().join(FILE), vec![b' '; MAX_BYTES as usize + 1]).unwrap();
        assert!(matches!(VmRecord::read(dir.path()), Err(RecordError::TooLarge(_))));
    }
}
