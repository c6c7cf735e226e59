//! Finishing what a process that died mid-operation left behind (the control plane's
//! reconcile after a daemon crash). Every operation that changes a VM's files leaves
//! records a later process can read, in this order:
//!
//! - **Suspend** ([`crate::Vm::suspend`]): the VM stopped, its state written into a staging
//!   directory beside the destination (`.<name>.staging-<pid>`, the disk moved into it),
//!   the manifest written last, the staging directory renamed into place, QEMU killed.
//!   [`settle_suspend`] rolls forward when a complete, verified snapshot exists (in place
//!   or still in staging: it is installed), else back (disk moved back to where QEMU has
//!   it, partial files removed); the caller then kills QEMU ([`discard`]) or continues it
//!   ([`crate::Vm::reattach_continuing`]).
//! - **Resume** ([`crate::Vm::resume`]): the manifest retired
//!   ([`crate::restore::RETIRED_MANIFEST`]), QEMU started (`vm.json` names the caller's
//!   VM, [`find_detached`]), the state loaded, the guest continued; the snapshot's state
//!   file is removed only after the caller recorded the VM
//!   ([`crate::restore::finish_resume`]). [`guest_ran`] tells whether a half-resumed
//!   QEMU's guest ever ran: if not, the snapshot still matches its disk and
//!   [`unretire`] puts it back.

use crate::qmp::Qmp;
use crate::record::VmRecord;
use crate::rundir::RunDir;
use crate::snapshot::{Snapshot, SnapshotKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Run directories under `run_root` of detached VMs the caller named `name`
/// ([`crate::VmConfig::name`]; the API names VMs after their microvm).
pub fn find_detached(run_root: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(run_root).into_iter().flatten().flatten() {
        if VmRecord::read(&e.path()).is_ok_and(|r| r.cfg.name.as_deref() == Some(name)) {
            found.push(e.path());
        }
    }
    found
}

/// Kills a detached VM's QEMU (without its agent: a stopped or hung guest costs nothing
/// here), removes its network namespace and its run directory. Nothing happens when
/// another process holds the VM.
pub async fn discard(dir: &Path) {
    let record = VmRecord::read(dir).ok();
    let Ok(lock) = RunDir::adopt(dir.to_path_buf()) else { return };
    if let Some(r) = &record {
        if let Ok(pidfd) = crate::qemu::open_pidfd(r.pid) {
            if r.qemu_runs() {
                crate::qemu::pidfd_kill(&pidfd);
                r.span().in_scope(|| tracing::info!(pid = r.pid, "killed a VM left by an interrupted operation"));
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                while r.qemu_runs() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        if r.netns.is_some() {
            crate::net::remove_stale(&r.id);
        }
        crate::jail::remove_groups(dir, r.cfg.jail.as_ref());
    }
    // Removes the run directory.
    drop(lock);
}

/// Whether the guest of the detached VM in `dir` may have run: false only when its QEMU
/// is alive and has not continued the vCPUs since it started (`inmigrate`, `prelaunch`,
/// or `paused` after loading a state), so its disk is untouched. A QEMU that is gone or
/// does not answer may have run it.
pub async fn guest_ran(dir: &Path) -> bool {
    let Ok(r) = VmRecord::read(dir) else { return true };
    if !r.qemu_runs() {
        return true;
    }
    let paths = crate::qemu::RunPaths::for_config(dir, &r.cfg);
    let status = async {
        let mut q = Qmp::connect(&paths.qmp).await.ok()?;
        q.execute_timeout("query-status", None, Duration::from_secs(2)).await.ok()
    };
    let status = tokio::time::timeout(Duration::from_secs(3), status).await.ok().flatten();
    let s = status.as_ref().and_then(|v| v.get("status")).and_then(serde_json::Value::as_str).unwrap_or("unknown");
    !matches!(s, "inmigrate" | "prelaunch" | "paused")
}

/// Puts back the manifest of a suspended VM whose resume was cut off before its guest
/// ran ([`guest_ran`] false, or no QEMU started), then opens (verifies) the snapshot.
pub fn unretire(dir: &Path) -> Result<Snapshot, crate::SnapshotError> {
    let retired = dir.join(crate::restore::RETIRED_MANIFEST);
    if retired.exists() && !dir.join("manifest.json").exists() {
        std::fs::rename(&retired, dir.join("manifest.json")).map_err(crate::snapshot::io("put the manifest back"))?;
        crate::snapshot::sync_dir(dir);
    }
    Snapshot::open(dir)
}

/// Whether a resume of the snapshot in `dir` was under way (its manifest retired, the
/// resumed VM not yet recorded: [`crate::restore::finish_resume`] not called).
pub fn resume_under_way(dir: &Path) -> bool {
    dir.join(crate::restore::RETIRED_MANIFEST).exists()
}

/// Settles a suspend into `dest` that a crash cut off, for the detached VM in `run_dir`
/// (if its record is still there). Rolls forward when a complete snapshot verifies
/// (manifest present, file sizes and the state's checksum as it records): in `dest`, or
/// in a staging directory, which is then installed as `dest`. Otherwise rolls back: the
/// disk goes back to the path QEMU has it under, partial files and staging directories
/// are removed, and the reason is returned; the VM's QEMU (stopped) is the caller's to
/// continue.
pub fn settle_suspend(dest: &Path, run_dir: Option<&Path>) -> Result<Snapshot, String> {
    let complete = |dir: &Path| Snapshot::open(dir).ok().filter(|s| s.manifest.kind == SnapshotKind::Suspended);
    let parent = dest.parent().unwrap_or(Path::new("."));
    let prefix = format!(".{}.staging-", dest.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot"));
    let stagings: Vec<PathBuf> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    let disk = run_dir.and_then(|d| VmRecord::read(d).ok()).and_then(|r| r.disk);
    let in_place = disk.as_deref().and_then(Path::parent) == Some(dest);
    // A resumed VM's own directory has a manifest only once a new suspend committed.
    if dest.join("manifest.json").exists() {
        if let Some(s) = complete(dest) {
            for st in &stagings {
                let _ = std::fs::remove_dir_all(st);
            }
            return Ok(s);
        }
    }
    if !in_place {
        for st in &stagings {
            if complete(st).is_some() && !dest.exists() && std::fs::rename(st, dest).is_ok() {
                crate::snapshot::sync_dir(parent);
                for other in stagings.iter().filter(|o| *o != st) {
                    let _ = std::fs::remove_dir_all(other);
                }
                return Snapshot::open(dest).map_err(|e| e.to_string());
            }
        }
    }
    // Back: the disk where QEMU has it, nothing partial left.
    let why =
        if stagings.is_empty() && !in_place { "no snapshot was written".to_owned() } else { "the snapshot was not complete".to_owned() };
    for st in &stagings {
        if let Some(d) = &disk {
            let staged = st.join("disk.qcow2");
            if staged.exists() && !d.exists() && std::fs::rename(&staged, d).is_err() {
                let _ = std::fs::copy(&staged, d);
            }
        }
        let _ = std::fs::remove_dir_all(st);
    }
    if in_place {
        for f in [".state.tmp", ".state.tmp.trim", "state", ".manifest.json.tmp", "manifest.json"] {
            let _ = std::fs::remove_file(dest.join(f));
        }
        crate::snapshot::sync_dir(dest);
    }
    crate::snapshot::sync_dir(parent);
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{record, write_manifest, Manifest, FORMAT_VERSION, MAGIC};

    fn manifest(dir: &Path) -> Manifest {
        Manifest {
            magic: MAGIC.into(),
            format_version: FORMAT_VERSION,
            kind: SnapshotKind::Suspended,
            created_unix_ms: 1,
            memory_mib: 1,
            vcpus: 1,
            accel: "tcg".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            qemu_version: "QEMU 10".into(),
            state: record(dir, "state").unwrap(),
            memory: None,
            disk: Some("disk.qcow2".into()),
            hostname: "h".into(),
            network: None,
            arch: Default::default(),
        }
    }

    #[test]
    fn a_complete_staging_directory_rolls_forward() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("suspended");
        let st = root.path().join(".suspended.staging-1234");
        std::fs::create_dir(&st).unwrap();
        std::fs::write(st.join("state"), b"ram and devices").unwrap();
        std::fs::write(st.join("disk.qcow2"), b"disk").unwrap();
        write_manifest(&st, &manifest(&st)).unwrap();
        let snap = settle_suspend(&dest, None).unwrap();
        assert_eq!(snap.dir, dest);
        assert!(!st.exists());
    }

    #[test]
    fn a_partial_or_damaged_one_rolls_back_with_the_disk() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("vm-1");
        std::fs::create_dir(&run).unwrap();
        let mut cfg = crate::VmConfig::new("/k", "/i");
        cfg.detached = true;
        let disk = run.join("overlay.qcow2");
        let rec = VmRecord {
            version: crate::record::VERSION,
            id: "vm-1".into(),
            cfg,
            accel: crate::Accel::Tcg,
            pid: u32::MAX,
            disk: Some(disk.clone()),
            disk_owned: true,
            netns: None,
            egress: Default::default(),
        };
        rec.write(&run);
        let dest = root.path().join("suspended");
        let st = root.path().join(".suspended.staging-99");
        std::fs::create_dir(&st).unwrap();
        std::fs::write(st.join("state"), b"ram and devices").unwrap();
        std::fs::write(st.join("disk.qcow2"), b"disk").unwrap();
        let m = manifest(&st);
        write_manifest(&st, &m).unwrap();
        // Damaged after the manifest: the checksum no longer matches.
        std::fs::write(st.join("state"), b"ram and devicez").unwrap();
        let e = settle_suspend(&dest, Some(&run)).unwrap_err();
        assert!(e.contains("not complete"), "{e}");
        assert!(!st.exists() && !dest.exists());
        assert_eq!(std::fs::read(&disk).unwrap(), b"disk");
    }

    #[test]
    fn a_retired_manifest_is_put_back() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state"), b"s").unwrap();
        std::fs::write(d.path().join("disk.qcow2"), b"d").unwrap();
        write_manifest(d.path(), &manifest(d.path())).unwrap();
        std::fs::rename(d.path().join("manifest.json"), d.path().join(crate::restore::RETIRED_MANIFEST)).unwrap();
        assert!(resume_under_way(d.path()));
        unretire(d.path()).unwrap();
        assert!(!resume_under_way(d.path()));
        crate::restore::finish_resume(d.path());
        assert!(!d.path().join("state").exists() && d.path().join("disk.qcow2").exists());
    }
}
