//! The process guard: every QEMU Hearth starts or adopts is held by a [`QemuProcess`],
//! through a pidfd where it must be killed synchronously (see the parent module).

use super::*;

/// A running QEMU, killed when dropped (unless released).
pub struct QemuProcess {
    pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// `true`: kill it; `false`: let it run on (released). Dropping the sender kills.
    kill: Option<oneshot::Sender<bool>>,
    /// For a detached or adopted QEMU: a pidfd to kill it synchronously when dropped (the
    /// watcher task may be gone already when the runtime shuts down, and nothing else
    /// would stop a QEMU that outlives us).
    pidfd: Option<std::os::fd::OwnedFd>,
    /// Adopted ([`Self::adopt`]): its exit status is not knowable.
    adopted: bool,
}

pub(crate) fn open_pidfd(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) })
}

/// Reaps the exited child behind `fd` and returns its status.
fn reap(fd: &std::os::fd::OwnedFd) -> Option<ExitStatus> {
    // SAFETY: siginfo_t is plain old data; waitid fills it for the pidfd we own.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; P_PIDFD (3) takes the descriptor as the id.
    let r = unsafe { libc::waitid(3 as libc::idtype_t, std::os::fd::AsRawFd::as_raw_fd(fd) as libc::id_t, &mut info, libc::WEXITED) };
    if r != 0 {
        return None;
    }
    // SAFETY: waitid filled a SIGCHLD siginfo, whose status field is valid.
    let status = unsafe { info.si_status() };
    let raw = if info.si_code == libc::CLD_EXITED { (status & 0xff) << 8 } else { status & 0x7f };
    Some(std::os::unix::process::ExitStatusExt::from_raw(raw))
}

pub(crate) fn pidfd_kill(fd: &std::os::fd::OwnedFd) {
    // SAFETY: pidfd_send_signal on a pidfd we own; no memory is involved, and a pidfd
    // never refers to a reused pid.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

impl QemuProcess {
    /// Starts QEMU with `args`, inside the network namespace bound at `netns` when given;
    /// its stderr goes to `stderr_log`. A `detached` QEMU gets its own session and no
    /// parent-death signal, so it outlives this process if released ([`Self::release`])
    /// or if this process dies; otherwise it dies with the thread that started it.
    pub fn spawn(binary: &Path, args: &[String], stderr_log: &Path, netns: Option<&Path>, detached: bool) -> std::io::Result<QemuProcess> {
        // Appended to (so trimming it, crate::console, leaves no hole), owner only.
        let log = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(stderr_log)?;
        log.set_len(0)?;
        let ns = netns.map(std::fs::File::open).transpose()?;
        let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).kill_on_drop(!detached);
        if !detached {
            cmd.process_group(0);
        }
        // SAFETY: runs in the child between fork and exec and only calls prctl(2),
        // setsid(2) and setns(2), which are async-signal-safe; `ns` stays open until after
        // the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if detached {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = ns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(ns);
        let pid = child.id().unwrap_or(0);
        // Our unreaped child: the pid is still this QEMU.
        let pidfd = if detached {
            match open_pidfd(pid) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    // Without it a detached QEMU could outlive everything: stop it now.
                    let _ = child.start_kill();
                    return Err(e);
                }
            }
        } else {
            None
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<bool>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                k = kill_rx => {
                    if k == Ok(false) {
                        // Released: it runs on; nobody here waits for it any more.
                        return;
                    }
                    // Killed on request or because the owner dropped us.
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = exit_tx.send(Some(status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(-1))));
        });
        Ok(QemuProcess { pid, exit: exit_rx, kill: Some(kill_tx), pidfd, adopted: false })
    }

    /// Starts QEMU with `args` in `jail` ([`crate::jail`]), inside the network namespace at
    /// `netns` when given; stderr goes to `stderr_log`. The pid kept is QEMU's host pid.
    pub(crate) fn spawn_jailed(
        jail: &crate::jail::Prepared,
        binary: &Path,
        args: &[String],
        stderr_log: &Path,
        netns: Option<&Path>,
        detached: bool,
    ) -> std::io::Result<QemuProcess> {
        let log = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(stderr_log)?;
        log.set_len(0)?;
        let ns = netns.map(std::fs::File::open).transpose()?;
        let (pid, fd) = crate::jail::spawn(jail, binary, args, &log, ns.as_ref(), detached)?;
        Self::watch_pidfd(pid, fd, true)
    }

    /// Takes over a QEMU this process did not start (a detached one whose starter is
    /// gone): its exit is watched through a pidfd (the status is not knowable: reported
    /// as killed by SIGKILL), and it is killed when dropped unless released again.
    pub fn adopt(pid: u32) -> std::io::Result<QemuProcess> {
        Self::watch_pidfd(pid, open_pidfd(pid)?, false)
    }

    /// Watches `fd` (a pidfd of `pid`); `child`: our own child, reaped for its status.
    fn watch_pidfd(pid: u32, fd: std::os::fd::OwnedFd, child: bool) -> std::io::Result<QemuProcess> {
        let kill_fd = fd.try_clone()?;
        // SAFETY: the descriptor is an OwnedFd moved into the AsyncFd, which deregisters it
        // before closing it; nothing else uses it.
        let afd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<bool>();
        tokio::spawn(async move {
            let killed = std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL);
            tokio::select! {
                _ = afd.readable() => {}
                k = kill_rx => {
                    if k == Ok(false) && !child {
                        return;
                    }
                    if k != Ok(false) {
                        pidfd_kill(afd.get_ref());
                    }
                    // A released child runs on; it is still reaped here when it ends.
                    let _ = afd.readable().await;
                }
            }
            let status = if child { reap(afd.get_ref()).unwrap_or(killed) } else { killed };
            let _ = exit_tx.send(Some(status));
        });
        Ok(QemuProcess { pid, exit: exit_rx, kill: Some(kill_tx), pidfd: Some(kill_fd), adopted: !child })
    }

    /// Kills QEMU now through its pidfd, when it has one (detached or adopted).
    pub fn kill_now(&self) {
        if let Some(fd) = &self.pidfd {
            pidfd_kill(fd);
        }
    }

    /// Lets QEMU run on without this handle (a detached QEMU then outlives this process).
    pub fn release(mut self) {
        self.pidfd = None;
        if let Some(k) = self.kill.take() {
            let _ = k.send(false);
        }
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True for a QEMU adopted by pid ([`Self::adopt`]), whose exit status is not knowable.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// A receiver of QEMU's exit status (`None` until it exits; closed without a status
    /// when QEMU is released).
    pub(crate) fn exit_receiver(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// QEMU's exit status once it has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut rx = self.exit.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        self.exited()
    }

    /// Waits for QEMU to exit, however long it takes.
    pub async fn exit_status(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(s) => s.expect("checked is_some"),
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(-1),
        };
        status
    }

    /// Kills QEMU (SIGKILL) and waits for it to be reaped.
    pub async fn kill(&mut self) -> ExitStatus {
        self.start_kill();
        self.exit_status().await
    }

    /// Kills QEMU (SIGKILL) without waiting: [`Self::exit_status`] says when it is reaped.
    pub fn start_kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(true);
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(true);
        }
        if let Some(fd) = &self.pidfd {
            pidfd_kill(fd);
        }
    }
}
