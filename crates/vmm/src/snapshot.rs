//! The on-disk snapshot format.
//!
//! A snapshot is a directory:
//!
//! ```text
//! manifest.json   what the snapshot is (magic, format version, machine, files, checksums)
//! state           QEMU migration stream: device state only (template) or device state
//!                 and RAM in `mapped-ram` layout (suspended VMs and forks); a suspended
//!                 VM with `memory` holds only the pages that differ from it (format 2)
//! memory          template: the guest's RAM as a raw file, mapped private copy-on-write
//!                 by every VM launched from it; suspended VM (format 2): a hard link to
//!                 the RAM file it was launched from, the base its `state` is a diff over
//! memory.json     suspended VM (format 2): `memory`'s record, kept after a resume
//! disk.qcow2      the root disk as it was at the snapshot (qcow2, backed by the base image)
//! ```
//!
//! The manifest is written last and renamed into place, so a directory without a valid
//! manifest is never mistaken for a snapshot. Reading checks the magic, refuses other
//! format versions with the reason, bounds every size, and verifies the state file's
//! checksum before QEMU sees a byte of it.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Magic string at the start of every manifest.
pub const MAGIC: &str = "hearth-snapshot";
/// The newest format version this build writes and reads. Version 2: a suspended VM's
/// `state` may be a diff over a `memory` file ([`crate::ramdiff`]).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads. Version 1 (a suspended VM's `state` holds
/// all of its non-zero RAM) is still written for every snapshot that needs nothing newer,
/// so older Hearths keep reading them.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Largest manifest read back.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest device-state file of a template snapshot (QEMU writes ~100 KB).
pub const MAX_TEMPLATE_STATE_BYTES: u64 = 256 << 20;
/// Largest state file of a suspended VM or fork (RAM included): 256 GiB + slack.
pub const MAX_STATE_BYTES: u64 = (256 << 30) + (1 << 30);

/// What a snapshot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// A pre-initialized VM to launch many clones from: RAM in `memory`, mapped
    /// copy-on-write; device state in `state` (taken with `x-ignore-shared`).
    Template,
    /// One suspended VM: RAM and devices in `state` (`mapped-ram`); resuming it hands
    /// the disk back to the VM and retires the snapshot.
    Suspended,
    /// A running VM's copy for forks: like `Suspended`, but any number of VMs may start
    /// from it, each on its own overlay.
    Fork,
}

/// A file of the snapshot with its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC-32 (IEEE) of the file's non-zero 4 KiB blocks with their offsets, hex (see
    /// [`file_crc32`]).
    pub crc32: String,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MAGIC`].
    pub magic: String,
    /// Format version; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// What the snapshot is for.
    pub kind: SnapshotKind,
    /// When it was taken, milliseconds since the epoch.
    pub created_unix_ms: u64,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Accelerator the VM ran with (`tcg` or `kvm`); restores use the same.
    pub accel: String,
    /// Kernel the VM booted (needed for an identical machine on restore).
    pub kernel: PathBuf,
    /// Initramfs the VM booted.
    pub initramfs: PathBuf,
    /// QEMU's version line; restoring with another QEMU is refused.
    pub qemu_version: String,
    /// The migration stream.
    pub state: FileRecord,
    /// Raw RAM (templates), or the base RAM file a suspended VM's `state` is a diff over
    /// (format 2).
    pub memory: Option<FileRecord>,
    /// Root disk (qcow2), if the VM had one.
    pub disk: Option<String>,
    /// Hostname at snapshot time.
    pub hostname: String,
    /// The VM had a network device, with this egress policy. Restores recreate the device
    /// in a new namespace (the guest sees the same addresses).
    #[serde(default)]
    pub network: Option<crate::net::Egress>,
    /// The guest's architecture. Left out for x86-64 (the only one before it was
    /// recorded), so older Hearths, which refuse unknown fields, still read those.
    #[serde(default, skip_serializing_if = "crate::arch::Arch::is_x86_64")]
    pub arch: crate::arch::Arch,
}

/// Why a snapshot cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File trouble.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a Hearth snapshot, or damaged.
    #[error("{path} is not a usable snapshot: {reason}")]
    Invalid {
        /// The snapshot directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Written by another format version.
    #[error("{path} has snapshot format version {found}; this Hearth reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION} (re-create the snapshot with this version)")]
    Version {
        /// The snapshot directory.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The VM cannot be snapshotted this way.
    #[error("{0}")]
    Unsupported(String),
    /// QEMU failed while saving.
    #[error("QEMU could not save the VM: {0}")]
    Qemu(String),
    /// The agent failed around the snapshot.
    #[error("the guest agent failed during the snapshot")]
    Agent(#[source] crate::agent::AgentError),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// Size and checksum of a file: CRC-32 over every 4 KiB block that is not all zeros,
/// each preceded by its offset (little-endian u64).
///
/// Skipping zero blocks makes the checksum a property of the content, not of how sparse
/// the file happens to be (a copy that filled the holes verifies the same), and lets the
/// reader jump over holes (`SEEK_DATA`): a suspended VM's state is RAM-sized but mostly
/// holes.
pub fn file_crc32(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    const BLOCK: usize = 4096;
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    // Blocks already hashed (data regions of small-block filesystems can share a 4 KiB block).
    let mut hashed_until: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an open descriptor; no memory is involved.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let start = (data as u64 / BLOCK as u64 * BLOCK as u64).max(hashed_until);
        let end = ((hole.max(data) as u64).div_ceil(BLOCK as u64) * BLOCK as u64).min(size);
        if start >= end {
            pos = end.max(pos + 1);
            continue;
        }
        f.seek(SeekFrom::Start(start))?;
        let mut off = start;
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    h.update(&(off + (i * BLOCK) as u64).to_le_bytes());
                    h.update(block);
                }
            }
            off += n as u64;
        }
        hashed_until = off;
        pos = end.max(pos + 1);
    }
    Ok((size, format!("{:08x}", h.finalize())))
}

/// Makes a [`FileRecord`] for `dir/name`.
pub fn record(dir: &Path, name: &str) -> Result<FileRecord, SnapshotError> {
    let (size, crc32) = file_crc32(&dir.join(name)).map_err(io(format!("checksum {name}")))?;
    Ok(FileRecord { name: name.to_owned(), size, crc32 })
}

/// An opened, verified snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Snapshot {
    /// Opens and verifies the snapshot in `dir`: manifest limits, magic, version, file
    /// sizes and the state file's checksum.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid { path: dir.to_path_buf(), reason };
        let mpath = dir.join("manifest.json");
        let meta = std::fs::metadata(&mpath).map_err(|e| invalid(format!("no manifest ({e})")))?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("manifest is {} bytes; the limit is {MAX_MANIFEST_BYTES}", meta.len())));
        }
        let text = std::fs::read(&mpath).map_err(io("read manifest"))?;
        let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| invalid(format!("manifest is not JSON: {e}")))?;
        if value.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
            return Err(invalid("manifest lacks the Hearth snapshot magic".into()));
        }
        match value.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if (u64::from(MIN_FORMAT_VERSION)..=u64::from(FORMAT_VERSION)).contains(&v) => {}
            Some(v) => return Err(SnapshotError::Version { path: dir.to_path_buf(), found: v as u32 }),
            None => return Err(invalid("manifest has no format version".into())),
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| invalid(format!("manifest is malformed: {e}")))?;
        let limit = match manifest.kind {
            SnapshotKind::Template => MAX_TEMPLATE_STATE_BYTES,
            _ => MAX_STATE_BYTES,
        };
        check_file(dir, &manifest.state, limit, true).map_err(invalid)?;
        if let Some(m) = &manifest.memory {
            let max = u64::from(manifest.memory_mib) << 20;
            check_file(dir, m, max, false).map_err(invalid)?;
        } else if manifest.kind == SnapshotKind::Template {
            return Err(invalid("template without a memory file".into()));
        }
        if manifest.memory.is_some() && manifest.kind == SnapshotKind::Fork {
            return Err(invalid("a fork with a memory file".into()));
        }
        if manifest.memory.is_some() && manifest.kind == SnapshotKind::Suspended && manifest.format_version < 2 {
            return Err(invalid(format!("a suspended VM with a memory file needs format version 2, not {}", manifest.format_version)));
        }
        if let Some(d) = &manifest.disk {
            check_name(d).map_err(invalid)?;
            if !dir.join(d).is_file() {
                return Err(invalid(format!("disk {d} is missing")));
            }
        }
        Ok(Snapshot { dir: dir.to_path_buf(), manifest })
    }

    /// Also checks the memory file's checksum (a read of all of a template's RAM, so
    /// [`Snapshot::open`], on every launch, checks its size only).
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        if let Some(m) = &self.manifest.memory {
            let max = u64::from(self.manifest.memory_mib) << 20;
            check_file(&self.dir, m, max, true).map_err(|reason| SnapshotError::Invalid { path: self.dir.clone(), reason })?;
        }
        Ok(())
    }

    /// Path of a file of the snapshot.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("bad file name {name:?} in manifest"));
    }
    Ok(())
}

fn check_file(dir: &Path, rec: &FileRecord, limit: u64, verify: bool) -> Result<(), String> {
    check_name(&rec.name)?;
    if rec.size > limit {
        return Err(format!("{} is {} bytes; the limit is {limit}", rec.name, rec.size));
    }
    let meta = std::fs::metadata(dir.join(&rec.name)).map_err(|e| format!("{} is missing ({e})", rec.name))?;
    if meta.len() != rec.size {
        return Err(format!("{} is {} bytes, the manifest says {} (truncated?)", rec.name, meta.len(), rec.size));
    }
    if verify {
        let (_, crc) = file_crc32(&dir.join(&rec.name)).map_err(|e| format!("cannot read {}: {e}", rec.name))?;
        if crc != rec.crc32 {
            return Err(format!("{} is corrupted (checksum {crc}, manifest {})", rec.name, rec.crc32));
        }
    }
    Ok(())
}

/// Writes `manifest` into `dir` atomically (temporary file, fsync, rename).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), SnapshotError> {
    let tmp = dir.join(".manifest.json.tmp");
    let bytes = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Unsupported(e.to_string()))?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io("write manifest"))?;
        f.write_all(&bytes).map_err(io("write manifest"))?;
        f.sync_all().map_err(io("sync manifest"))?;
    }
    std::fs::rename(&tmp, dir.join("manifest.json")).map_err(io("install manifest"))?;
    sync_dir(dir);
    Ok(())
}

/// fsync of a directory, so renames in it are durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// QEMU's version line (cached per binary); `"unknown"` when it cannot be read, which
/// never matches a recorded version.
pub fn qemu_version(binary: &Path) -> String {
    static V: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = V.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, v)) = cache.iter().find(|(b, _)| b == binary) {
        return v.clone();
    }
    let v = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "unknown".into());
    if v != "unknown" {
        cache.push((binary.to_path_buf(), v.clone()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Manifest {
        std::fs::write(dir.join("state"), b"device state").unwrap();
        std::fs::write(dir.join("memory"), vec![0u8; 4096]).unwrap();
        Manifest {
            magic: MAGIC.into(),
            format_version: FORMAT_VERSION,
            kind: SnapshotKind::Template,
            created_unix_ms: 1,
            memory_mib: 1,
            vcpus: 1,
            accel: "tcg".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            qemu_version: "QEMU 10".into(),
            state: record(dir, "state").unwrap(),
            memory: Some(record(dir, "memory").unwrap()),
            disk: None,
            hostname: "h".into(),
            network: None,
            arch: Default::default(),
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        let m = sample(d.path());
        write_manifest(d.path(), &m).unwrap();
        assert_eq!(Snapshot::open(d.path()).unwrap().manifest, m);

        let mem = Snapshot::open(d.path()).unwrap();
        mem.verify_memory().unwrap();
        std::fs::write(d.path().join("memory"), [vec![1u8], vec![0u8; 4095]].concat()).unwrap();
        assert!(mem.verify_memory().unwrap_err().to_string().contains("corrupted"));
        assert!(Snapshot::open(d.path()).is_ok(), "open checks the memory file's size only");

        std::fs::write(d.path().join("state"), b"device stat!").unwrap();
        let e = Snapshot::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("corrupted"), "{e}");

        std::fs::write(d.path().join("state"), b"device").unwrap();
        let e = Snapshot::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn the_architecture_is_recorded_only_when_not_x86_64() {
        let d = tempfile::tempdir().unwrap();
        let mut m = sample(d.path());
        write_manifest(d.path(), &m).unwrap();
        let text = std::fs::read_to_string(d.path().join("manifest.json")).unwrap();
        assert!(!text.contains("arch"), "x86-64 manifests stay readable by older Hearths: {text}");
        m.arch = crate::arch::Arch::Aarch64;
        write_manifest(d.path(), &m).unwrap();
        assert_eq!(Snapshot::open(d.path()).unwrap().manifest.arch, crate::arch::Arch::Aarch64);
    }

    #[test]
    fn checksum_ignores_sparseness_but_not_content() {
        let d = tempfile::tempdir().unwrap();
        let sparse = d.path().join("sparse");
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"hello", 5 << 20).unwrap();
        let mut dense = vec![0u8; 8 << 20];
        dense[5 << 20..(5 << 20) + 5].copy_from_slice(b"hello");
        std::fs::write(d.path().join("dense"), &dense).unwrap();
        let a = file_crc32(&sparse).unwrap();
        assert_eq!(a, file_crc32(&d.path().join("dense")).unwrap());
        dense[(5 << 20) + 1] = b'E';
        std::fs::write(d.path().join("dense"), &dense).unwrap();
        assert_ne!(a, file_crc32(&d.path().join("dense")).unwrap());
        // The same bytes at another offset are another file.
        let moved = d.path().join("moved");
        let g = std::fs::File::create(&moved).unwrap();
        g.set_len(8 << 20).unwrap();
        g.write_all_at(b"hello", 6 << 20).unwrap();
        assert_ne!(a, file_crc32(&moved).unwrap());
    }

    #[test]
    fn suspended_images_of_both_versions_are_read() {
        let d = tempfile::tempdir().unwrap();
        let mut m = sample(d.path());
        // Version 1, written by older Hearths: all of RAM in `state`, no memory file.
        m.kind = SnapshotKind::Suspended;
        m.format_version = MIN_FORMAT_VERSION;
        let base = m.memory.take();
        write_manifest(d.path(), &m).unwrap();
        assert_eq!(Snapshot::open(d.path()).unwrap().manifest, m);
        // Version 2: a diff over a memory file.
        m.format_version = FORMAT_VERSION;
        m.memory = base;
        write_manifest(d.path(), &m).unwrap();
        assert_eq!(Snapshot::open(d.path()).unwrap().manifest, m);
        // A version 1 reader would resume it over zeros: a memory file needs version 2.
        m.format_version = 1;
        write_manifest(d.path(), &m).unwrap();
        assert!(Snapshot::open(d.path()).unwrap_err().to_string().contains("needs format version 2"));
        std::fs::remove_file(d.path().join("memory")).unwrap();
        m.format_version = 2;
        write_manifest(d.path(), &m).unwrap();
        assert!(Snapshot::open(d.path()).unwrap_err().to_string().contains("memory is missing"));
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut m = sample(d.path());
        m.format_version = FORMAT_VERSION + 1;
        write_manifest(d.path(), &m).unwrap();
        let e = Snapshot::open(d.path()).unwrap_err();
        assert!(matches!(e, SnapshotError::Version { found: 3, .. }), "{e}");
        assert!(e.to_string().contains("versions 1 to 2"), "{e}");
        m.format_version = 0;
        write_manifest(d.path(), &m).unwrap();
        assert!(matches!(Snapshot::open(d.path()).unwrap_err(), SnapshotError::Version { found: 0, .. }));

        std::fs::write(d.path().join("manifest.json"), b"{\"magic\":\"nope\"}").unwrap();
        assert!(Snapshot::open(d.path()).unwrap_err().to_string().contains("magic"));
        std::fs::write(d.path().join("manifest.json"), vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize]).unwrap();
        assert!(Snapshot::open(d.path()).unwrap_err().to_string().contains("limit"));
    }

    proptest::proptest! {
        /// Whatever a manifest contains, opening it is an error or a snapshot, never a panic.
        #[test]
        fn random_manifests_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("manifest.json"), &bytes).unwrap();
            let _ = Snapshot::open(d.path());
        }

        /// Valid JSON with the right magic and version but arbitrary other fields.
        #[test]
        fn mangled_fields_never_panic(size in proptest::prelude::any::<u64>(), name in "[a-z./]{0,12}", kind in 0u8..4) {
            let d = tempfile::tempdir().unwrap();
            let kinds = ["template", "suspended", "fork", "bogus"];
            let m = serde_json::json!({
                "magic": MAGIC, "format_version": FORMAT_VERSION, "kind": kinds[kind as usize],
                "created_unix_ms": 0, "memory_mib": 1, "vcpus": 1, "accel": "tcg",
                "kernel": "/k", "initramfs": "/i", "qemu_version": "q",
                "state": { "name": name, "size": size, "crc32": "0" },
                "memory": null, "disk": null, "hostname": "h",
            });
            std::fs::write(d.path().join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
            proptest::prop_assert!(Snapshot::open(d.path()).is_err());
        }
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut m = sample(d.path());
        m.disk = Some("../../etc/passwd".into());
        write_manifest(d.path(), &m).unwrap();
        assert!(Snapshot::open(d.path()).unwrap_err().to_string().contains("bad file name"));
    }
}
