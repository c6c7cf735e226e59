//! Run directories: one per VM (`$HEARTH_HOME/run/<vm-id>/`), locked while the VM lives,
//! removed with it, and swept when their owner died without cleaning up; detached VMs
//! that nobody owns are found through their record ([`crate::record`]) and killed.

use crate::record::VmRecord;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A VM's run directory, removed when dropped. While it lives, its `lock` file is held
/// (`flock`), so [`sweep_stale_run_dirs`] can tell a live directory from one left by a
/// process that died without cleaning up (host crash, `kill -9`).
pub(crate) struct RunDir(pub(crate) PathBuf, #[allow(dead_code)] Option<std::fs::File>);

impl RunDir {
    pub(crate) fn create(path: PathBuf) -> std::io::Result<RunDir> {
        std::fs::create_dir_all(&path)?;
        let lock = std::fs::File::create(path.join("lock"))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) };
        Ok(RunDir(path, Some(lock)))
    }
}

impl RunDir {
    /// Takes an existing directory (a detached VM's) and its lock; fails when another
    /// process holds it.
    pub(crate) fn adopt(path: PathBuf) -> std::io::Result<RunDir> {
        let lock = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path.join("lock"))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::other("another process holds this VM"));
        }
        Ok(RunDir(path, Some(lock)))
    }

    /// Gives the directory up without removing it (its VM runs on, detached).
    pub(crate) fn release(mut self) {
        drop(self.1.take());
        std::mem::forget(self);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes run directories whose owner is gone (their lock is free), with the large
/// files they may hold (overlays, RAM files). Returns how many were removed. Live VMs of
/// any process keep their lock and are left alone.
pub fn sweep_stale_run_dirs(run_root: &Path) -> usize {
    let mut removed = 0;
    for e in std::fs::read_dir(run_root).into_iter().flatten().flatten() {
        let dir = e.path();
        if !dir.is_dir() || !e.file_name().to_string_lossy().starts_with("vm-") {
            continue;
        }
        let stale = match std::fs::File::open(dir.join("lock")) {
            Ok(f) => {
                // SAFETY: flock on a descriptor we own; no memory is involved.
                let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) };
                r == 0
            }
            // No lock file: a directory from before locks existed, or one being created
            // right now; only sweep it when it is older than a minute.
            Err(_) => {
                e.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60)).unwrap_or(false)
            }
        };
        // A detached VM whose starter is gone still runs: it is waiting to be reattached.
        let stale = stale && !crate::record::live_detached(&dir);
        if stale {
            crate::net::remove_stale(&e.file_name().to_string_lossy());
            // A jailed VM's cgroups, named by the uid that owns its `q/`.
            // (A VM that was not detached may have no record: the default root then.)
            let jail = VmRecord::read(&dir).ok().map_or_else(|| Some(crate::jail::JailConfig::default()), |r| r.cfg.jail);
            crate::jail::remove_groups(&dir, jail.as_ref());
        }
        if stale && std::fs::remove_dir_all(&dir).is_ok() {
            tracing::info!(dir = %dir.display(), "removed a stale run directory");
            removed += 1;
        }
    }
    removed
}

/// Kills detached VMs under `run_root` that no process holds (their lock is free) while
/// their QEMU runs: VMs whose owner died before recording them anywhere. Their network
/// namespaces go with them; the run-directory sweep removes the rest.
pub fn kill_unowned_detached(run_root: &Path) -> usize {
    let mut killed = 0;
    for e in std::fs::read_dir(run_root).into_iter().flatten().flatten() {
        let dir = e.path();
        let Ok(record) = VmRecord::read(&dir) else { continue };
        // Taking the lock proves nobody owns it; holding it keeps others off meanwhile.
        let Ok(lock) = RunDir::adopt(dir.clone()) else { continue };
        if let Ok(pidfd) = crate::qemu::open_pidfd(record.pid) {
            if record.qemu_runs() {
                crate::qemu::pidfd_kill(&pidfd);
                let span = record.span();
                span.in_scope(|| tracing::warn!(pid = record.pid, "killed a detached VM nobody owned"));
                killed += 1;
            }
        }
        if record.netns.is_some() {
            crate::net::remove_stale(&record.id);
        }
        drop(lock);
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_dirs_whose_owner_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let live = RunDir::create(root.path().join("vm-live")).unwrap();
        {
            // A directory whose owner died: its lock file exists but nobody holds it.
            let mut dead = RunDir::create(root.path().join("vm-dead")).unwrap();
            drop(dead.1.take());
            // Its owner "dies" without its Drop running.
            std::mem::forget(dead);
        }
        std::fs::create_dir(root.path().join("not-a-vm")).unwrap();
        assert_eq!(sweep_stale_run_dirs(root.path()), 1);
        assert!(live.0.is_dir());
        assert!(!root.path().join("vm-dead").exists());
        assert!(root.path().join("not-a-vm").exists());
    }
}
