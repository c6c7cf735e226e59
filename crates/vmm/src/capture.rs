//! Saving VMs: template snapshots, suspends, and forks.
//!
//! Every capture follows the same steps: detach the agent (so the guest waits for a fresh
//! connection, which is what it will get after the restore), `stop` the vCPUs (QEMU drains
//! and flushes the disk, so disk and RAM are captured at the same instant), write the
//! migration stream to a temporary file, then move the files into place and write the
//! manifest last. A failure before the manifest leaves no snapshot and, for suspends and
//! forks, a VM that keeps running.

use crate::migration::{self, MigrationError};
use crate::snapshot::{self, io, FileRecord, Manifest, Snapshot, SnapshotError, SnapshotKind};
use crate::vm::{breaks_session, vm_event, Vm};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::Instrument;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A staging directory beside the destination, removed unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(dest: &Path) -> Result<Staging, SnapshotError> {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot");
        let path = parent.join(format!(".{name}.staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(io(format!("create {}", path.display())))?;
        Ok(Staging { path, committed: false })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Vm {
    fn manifest(&self, kind: SnapshotKind, state: FileRecord, memory: Option<FileRecord>, disk: bool) -> Manifest {
        Manifest {
            magic: snapshot::MAGIC.into(),
            // Version 2 only where it is needed (a diff over a memory file), so older
            // Hearths still read everything else.
            format_version: if kind == SnapshotKind::Suspended && memory.is_some() {
                snapshot::FORMAT_VERSION
            } else {
                snapshot::MIN_FORMAT_VERSION
            },
            kind,
            created_unix_ms: now_ms(),
            memory_mib: self.record.cfg.memory_mib,
            vcpus: self.record.cfg.vcpus,
            accel: self.record.accel.to_string(),
            kernel: self.record.cfg.kernel.clone(),
            initramfs: self.record.cfg.initramfs.clone(),
            qemu_version: snapshot::qemu_version(&self.record.cfg.qemu_binary),
            state,
            memory,
            disk: disk.then(|| "disk.qcow2".to_owned()),
            hostname: self.record.cfg.hostname.clone(),
            network: self.egress(),
            arch: self.record.cfg.arch,
        }
    }

    /// Detaches the agent and stops the vCPUs.
    async fn quiesce(&self) -> Result<(), SnapshotError> {
        if let Err(e) = self.agent.detach(Duration::from_secs(5)).await {
            vm_event!(self, warn, "agent detach before snapshot failed: {e}");
        }
        self.qmp("stop", None).await.map_err(|e| SnapshotError::Qemu(e.to_string()))?;
        Ok(())
    }

    /// Refuses to snapshot a VM whose disk Hearth does not own (a user's image in place).
    fn check_disk_owned(&self) -> Result<(), SnapshotError> {
        if self.record.disk.is_some() && !self.record.disk_owned {
            return Err(SnapshotError::Unsupported(
                "this VM writes a disk image of the user's in place; snapshots need a VM on an overlay (Disk::base)".into(),
            ));
        }
        Ok(())
    }

    /// Reserves room in `dest`'s filesystem for what a capture will write (the guest's
    /// possibly non-zero RAM, device state, and the disk when `copies_disk`), before the
    /// VM is touched, or refuses saying needed vs available ([`crate::space`]). QEMU writing
    /// RAM with several threads does not survive running out of space mid-way, so this is
    /// what keeps a too-full disk from costing the VM. Release the reservation just before
    /// QEMU writes.
    fn check_space(&self, dest: &Path, copies_disk: bool) -> Result<crate::space::Reservation, SnapshotError> {
        let backing = match &self.record.cfg.memory {
            crate::config::Memory::Anonymous => None,
            crate::config::Memory::SnapshotReady => Some(self.paths.memory.clone()),
            crate::config::Memory::Template(p) => Some(p.clone()),
        };
        let disk = self.record.disk.as_deref().filter(|_| copies_disk);
        let ram_size = u64::from(self.record.cfg.memory_mib) << 20;
        let estimate = crate::space::estimate(self.process.pid(), ram_size, backing.as_deref(), disk);
        let needed = estimate.needed();
        vm_event!(self, debug, ram_in_use = estimate.ram, needed, "capture: space estimated");
        crate::space::reserve(dest, needed).map_err(|e| match e {
            crate::space::ReserveError::NoRoom { dir, needed, available } => SnapshotError::Io {
                what: format!(
                    "not enough space at {}: saving this VM needs {} MiB ({} MiB of guest RAM in use, plus device state{}), {} MiB are available",
                    dir.display(),
                    needed.div_ceil(1 << 20),
                    estimate.ram >> 20,
                    if estimate.disk > 0 { " and the disk" } else { "" },
                    available >> 20
                ),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
            crate::space::ReserveError::Io(source) => SnapshotError::Io { what: format!("reserve space for {}", dest.display()), source },
        })
    }

    /// Saves the stopped VM's state to `file` ([`migration::save`]).
    /// A jailed QEMU sees only its own directory: it writes there, and the file is handed
    /// back to root and moved to `file` (a rename: the run directory and snapshots share
    /// `$HEARTH_HOME`'s filesystem; a copy otherwise).
    async fn migrate_to(&self, file: &Path, mapped_ram: bool) -> Result<(), SnapshotError> {
        let q = |e: String| SnapshotError::Qemu(e);
        let jailed = self.record.cfg.jail.is_some();
        let target = if jailed { self.paths.qmp.with_file_name(".migrate.tmp") } else { file.to_path_buf() };
        let mut session = self.qmp_session().await.map_err(|e| q(e.to_string()))?;
        let qmp = session.as_mut().expect("connected by qmp_session");
        let saved = migration::save(qmp, &target, mapped_ram).await;
        if let Err(MigrationError::Qmp(e)) = &saved {
            if breaks_session(e) {
                *session = None;
            }
        }
        drop(session);
        if jailed {
            let moved = saved.is_ok().then(|| {
                crate::jail::hand_back(&target)?;
                std::fs::rename(&target, file).or_else(|_| std::fs::copy(&target, file).map(drop))
            });
            let _ = std::fs::remove_file(&target);
            if let Some(Err(e)) = moved {
                return Err(SnapshotError::Io { what: format!("move the state into {}", file.display()), source: e });
            }
        }
        saved.map_err(|e| q(e.to_string()))
    }

    /// Brings a VM back after a capture (failed, or a fork's): vCPUs running, a fresh agent
    /// connection on the same socket (falling back to a new socket).
    async fn unquiesce(&mut self) {
        let _ = self.qmp("cont", None).await;
        match self.agent.reattach(Duration::from_secs(10)).instrument(self.span.clone()).await {
            Ok((agent, hello)) => {
                self.agent = agent;
                self.hello = hello;
            }
            Err(e) => {
                vm_event!(self, debug, "reattach failed ({e}); reconnecting");
                if let Err(e) = self.reconnect(Duration::from_secs(30)).await {
                    vm_event!(self, warn, "agent did not come back after a snapshot: {e}");
                }
            }
        }
    }

    /// Takes a template snapshot into `dest` and ends the VM. The VM must have been started
    /// with [`crate::config::Memory::SnapshotReady`] so its RAM already is a file (moved,
    /// not copied). Launch clones with [`Vm::launch`].
    pub async fn snapshot_template(mut self, dest: &Path) -> Result<Snapshot, SnapshotError> {
        if self.record.cfg.memory != crate::config::Memory::SnapshotReady {
            return Err(SnapshotError::Unsupported("only a VM started with Memory::SnapshotReady can become a template".into()));
        }
        if dest.exists() {
            return Err(SnapshotError::Unsupported(format!("{} already exists", dest.display())));
        }
        self.check_disk_owned()?;
        let mut staging = Staging::new(dest)?;
        self.quiesce().await?;
        self.migrate_to(&staging.path.join("state"), false).await?;
        sync_file(&staging.path.join("state"))?;
        // RAM is the memory file's pages: once QEMU is gone the file is complete.
        self.process.kill().await;
        let mem = staging.path.join("memory");
        if let Err(e) = std::fs::rename(&self.paths.memory, &mem) {
            if e.raw_os_error() != Some(libc::EXDEV) {
                return Err(SnapshotError::Io { what: "move the memory file".into(), source: e });
            }
            std::fs::copy(&self.paths.memory, &mem).map_err(io("copy the memory file"))?;
        }
        if self.record.cfg.jail.is_some() {
            // Every clone maps it read-only, each under its own uid.
            crate::jail::hand_back(&mem).map_err(io("hand the memory file back"))?;
        }
        std::fs::File::open(&mem).and_then(|f| f.sync_all()).map_err(io("sync the memory file"))?;
        let has_disk = self.stage_disk(&staging.path)?;
        let manifest = self.manifest(
            SnapshotKind::Template,
            snapshot::record(&staging.path, "state")?,
            Some(snapshot::record(&staging.path, "memory")?),
            has_disk,
        );
        commit(&mut staging, dest, &manifest)
    }

    /// Suspends the VM into `dest`: RAM and device state in one `mapped-ram` file, the
    /// disk moved beside it; QEMU ends and frees its CPU and memory. A VM launched from a
    /// template (or resumed from such a suspend) keeps only the pages it changed since the
    /// template's RAM file, which is hard-linked beside them as `memory`
    /// ([`crate::ramdiff`]); any other VM keeps its non-zero pages.
    /// Resume with [`Vm::resume`], from this or another Hearth process.
    ///
    /// `dest` must not exist, or must be the directory this VM was resumed from (its disk
    /// lives there). On failure (disk full, QEMU error) nothing partial is left and the VM
    /// is handed back running, unless QEMU itself died (check [`Vm::is_running`]).
    pub async fn suspend(mut self, dest: &Path) -> Result<Snapshot, (Box<Vm>, SnapshotError)> {
        let reserved = match self.check_disk_owned().and_then(|()| self.check_space(dest, false)) {
            Ok(r) => r,
            Err(e) => return Err((Box::new(self), e)),
        };
        let in_place = self.record.disk.as_deref().and_then(Path::parent) == Some(dest);
        if !in_place && dest.exists() {
            let e = SnapshotError::Unsupported(format!("{} already exists", dest.display()));
            return Err((Box::new(self), e));
        }
        let mut staging = if in_place {
            None
        } else {
            match Staging::new(dest) {
                Ok(s) => Some(s),
                Err(e) => return Err((Box::new(self), e)),
            }
        };
        let dir = staging.as_ref().map_or_else(|| dest.to_path_buf(), |s| s.path.clone());
        let tmp = dir.join(".state.tmp");
        if let Err(e) = self.quiesce().await {
            self.unquiesce().await;
            return Err((Box::new(self), e));
        }
        crate::crash::point("suspend.stopped");
        let t = std::time::Instant::now();
        let saved = async {
            let _writing = reserved.release();
            self.migrate_to(&tmp, true).await?;
            vm_event!(self, debug, elapsed = ?t.elapsed(), "suspend: RAM and state written");
            let base = self.diff_over_base(&dir, &tmp)?;
            crate::crash::point("suspend.trimmed");
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("sync the state file"))?;
            vm_event!(self, debug, elapsed = ?t.elapsed(), "suspend: state synced");
            crate::crash::point("suspend.state-written");
            Ok::<Option<FileRecord>, SnapshotError>(base)
        };
        let base = match saved.await {
            Ok(base) => base,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                if self.is_running() {
                    self.unquiesce().await;
                }
                return Err((Box::new(self), e));
            }
        };
        // Commit while QEMU still holds the VM (stopped, its disk flushed and released by
        // the migration): if anything fails now, undo and hand the VM back running.
        let disk_from = self.record.disk.clone();
        let staged = self.stage_disk(&dir);
        let committed = staged.and_then(|has_disk| {
            crate::crash::point("suspend.disk-staged");
            std::fs::rename(&tmp, dir.join("state")).map_err(io("install the state file"))?;
            let manifest = self.manifest(SnapshotKind::Suspended, snapshot::record(&dir, "state")?, base.clone(), has_disk);
            match staging.as_mut() {
                Some(s) => commit(s, dest, &manifest),
                None => {
                    snapshot::write_manifest(dest, &manifest)?;
                    Ok(Snapshot { dir: dest.to_path_buf(), manifest })
                }
            }
        });
        vm_event!(self, debug, elapsed = ?t.elapsed(), "suspend: committed");
        match committed {
            Ok(snap) => {
                crate::crash::point("suspend.committed");
                // The saved state is the VM now: QEMU goes, SIGKILLed at once (through the
                // pidfd a daemon's detached QEMU has), and reaped before the answer, so that
                // a suspended VM has no process, namespace or cgroup left when it returns.
                // (Reaping a resumed guest's QEMU took up to ~450 ms on a busy host,
                // measured; answering before it left namespaces behind the answer.)
                self.process.kill_now();
                self.process.kill().await;
                vm_event!(self, debug, elapsed = ?t.elapsed(), "suspend: QEMU gone");
                if let Some(from) = disk_from.filter(|f| f.exists() && f.parent() != Some(dest)) {
                    let _ = std::fs::remove_file(from);
                }
                // The rest goes before the answer too, off the async workers: `ip netns
                // del`, the cgroup's removal (which may wait for the group to empty), the
                // run directory.
                let _ = tokio::task::spawn_blocking(move || drop(self)).await;
                Ok(snap)
            }
            Err(e) => {
                // Put the disk back where QEMU expects it, drop partial files, run on.
                let target = dir.join("disk.qcow2");
                if let Some(from) = &disk_from {
                    if from != &target && !from.exists() && target.exists() {
                        let _ = std::fs::rename(&target, from);
                    }
                }
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(dir.join("state"));
                if in_place {
                    let _ = std::fs::remove_file(dir.join("manifest.json"));
                }
                self.unquiesce().await;
                Err((Box::new(self), e))
            }
        }
    }

    /// Cuts the suspend image `state` in `dir` down to the pages changed since the RAM file
    /// the VM maps private ([`crate::ramdiff::trim`]), linking that file into `dir` as
    /// `memory` (with its record in `memory.json`, which outlives a resume). Returns the
    /// base's record, or `None` when the image keeps all of RAM: the VM has no base file,
    /// or it cannot be linked (another filesystem) or found in QEMU's memory map. An error
    /// once the image was changed fails the suspend.
    fn diff_over_base(&self, dir: &Path, state: &Path) -> Result<Option<FileRecord>, SnapshotError> {
        let crate::config::Memory::Template(base) = &self.record.cfg.memory else { return Ok(None) };
        let linked = dir.join("memory");
        if !same_file(base, &linked) {
            let _ = std::fs::remove_file(&linked);
            if let Err(e) = std::fs::hard_link(base, &linked) {
                vm_event!(self, warn, "suspend keeps all of RAM: cannot link {} into {} ({e})", base.display(), dir.display());
                return Ok(None);
            }
        }
        let record = base_record(base, dir)?;
        let t = std::time::Instant::now();
        let ram_size = u64::from(self.record.cfg.memory_mib) << 20;
        match crate::ramdiff::trim(state, self.process.pid(), base, ram_size) {
            Ok(stats) => {
                vm_event!(self, debug, kept = stats.kept, dropped = stats.dropped, elapsed = ?t.elapsed(), "suspend: image cut to the pages changed since the template");
                Ok(Some(record))
            }
            Err(e @ (crate::ramdiff::TrimError::NoHeader { .. } | crate::ramdiff::TrimError::NoMapping { .. })) => {
                vm_event!(self, warn, "suspend keeps all of RAM: {e}");
                Ok(None)
            }
            Err(e) => Err(SnapshotError::Io { what: e.to_string(), source: std::io::Error::other(e) }),
        }
    }

    /// Puts the VM's disk into `dir` as `disk.qcow2` while QEMU is stopped: a rename on
    /// the same filesystem, else a copy (the original is removed once committed).
    fn stage_disk(&self, dir: &Path) -> Result<bool, SnapshotError> {
        let Some(disk) = &self.record.disk else { return Ok(false) };
        let target = dir.join("disk.qcow2");
        if disk != &target {
            match std::fs::rename(disk, &target) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    std::fs::copy(disk, &target).map_err(io(format!("copy the disk to {}", target.display())))?;
                }
                Err(e) => return Err(SnapshotError::Io { what: format!("move the disk {}", disk.display()), source: e }),
            }
        }
        // A jailed VM's disk stays its uid's: a failed capture puts it back and `cont`
        // makes QEMU reopen it read-write. The jail that next uses it takes it over
        // (`jail::prepare`: chown for a resumed VM, `o+r` for a template's clones).
        std::fs::File::open(&target).and_then(|f| f.sync_all()).map_err(io("sync the disk"))?;
        Ok(true)
    }

    /// Snapshots the running VM into `dest` for forking, and lets it run on: copies start
    /// from it with [`Vm::launch_fork`], each with its own overlay on the copied disk.
    pub async fn fork_snapshot(&mut self, dest: &Path) -> Result<Snapshot, SnapshotError> {
        if dest.exists() {
            return Err(SnapshotError::Unsupported(format!("{} already exists", dest.display())));
        }
        self.check_disk_owned()?;
        let reserved = self.check_space(dest, true)?;
        let mut staging = Staging::new(dest)?;
        // No detach here: the original keeps its agent connection and its running execs.
        // The copies wake mid-connection and resynchronise when their host probes (the
        // probe breaks the stale HTTP/2 connection in the copy; the next one is answered).
        self.qmp("stop", None).await.map_err(|e| SnapshotError::Qemu(e.to_string()))?;
        crate::crash::point("fork.stopped");
        let saved = async {
            let _writing = reserved.release();
            // Stopped means drained and flushed: the overlay is consistent with RAM.
            let has_disk = match &self.record.disk {
                Some(d) => {
                    std::fs::copy(d, staging.path.join("disk.qcow2")).map_err(io("copy the disk"))?;
                    sync_file(&staging.path.join("disk.qcow2"))?;
                    true
                }
                None => false,
            };
            self.migrate_to(&staging.path.join("state"), true).await?;
            sync_file(&staging.path.join("state"))?;
            Ok::<bool, SnapshotError>(has_disk)
        };
        let result = saved.await;
        if let Err(e) = self.qmp("cont", None).await {
            vm_event!(self, warn, "could not resume the original after a fork snapshot: {e}");
        }
        let has_disk = result?;
        let manifest = self.manifest(SnapshotKind::Fork, snapshot::record(&staging.path, "state")?, None, has_disk);
        commit(&mut staging, dest, &manifest)
    }
}

/// True when `a` and `b` are the same file (one inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The record of base RAM file `base` (linked into `dir` as `memory`): its template's
/// manifest or the `memory.json` a previous suspend left beside it hold its checksum; it
/// is computed (a read of all of it) only when neither does. Written to `dir/memory.json`.
fn base_record(base: &Path, dir: &Path) -> Result<FileRecord, SnapshotError> {
    let beside = base.parent().unwrap_or(Path::new("."));
    let known = Snapshot::open(beside)
        .ok()
        .and_then(|s| s.manifest.memory.filter(|m| Some(std::ffi::OsStr::new(&m.name)) == base.file_name()))
        .or_else(|| {
            let text = std::fs::read(beside.join("memory.json")).ok()?;
            serde_json::from_slice::<FileRecord>(&text).ok()
        });
    let size = std::fs::metadata(base).map_err(io("stat the base RAM file"))?.len();
    let mut record = match known.filter(|r| r.size == size) {
        Some(r) => r,
        None => snapshot::record(beside, &base.file_name().unwrap_or_default().to_string_lossy())?,
    };
    record.name = "memory".into();
    let bytes = serde_json::to_vec(&record).map_err(|e| SnapshotError::Unsupported(e.to_string()))?;
    let write = || {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.join("memory.json"))?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    write().map_err(io("write memory.json"))?;
    Ok(record)
}

fn sync_file(path: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(format!("sync {}", path.display())))
}

/// Writes the manifest into the staging directory and renames it to `dest`.
fn commit(staging: &mut Staging, dest: &Path, manifest: &Manifest) -> Result<Snapshot, SnapshotError> {
    snapshot::write_manifest(&staging.path, manifest)?;
    crate::crash::point("snapshot.manifest-staged");
    std::fs::rename(&staging.path, dest).map_err(io(format!("install {}", dest.display())))?;
    staging.committed = true;
    if let Some(parent) = dest.parent() {
        snapshot::sync_dir(parent);
    }
    // Just written and checksummed: no need to read it all back.
    Ok(Snapshot { dir: dest.to_path_buf(), manifest: manifest.clone() })
}
