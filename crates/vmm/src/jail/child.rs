//! Starting QEMU in its jail: `clone3`, then the child's steps up to `execve`.
//!
//! The child is a copy of a multi-threaded process, so between clone and exec it may only
//! make async-signal-safe calls: raw system calls on memory prepared before the clone. No
//! allocation, no locks, no `std` I/O. A failed step writes `[step, errno]` to a
//! close-on-exec pipe and exits; an empty read on the parent's end means QEMU was
//! executed.

use super::{Op, Prepared};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `struct clone_args` (the first version, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// The child's steps, named in errors.
const STEPS: [&str; 16] = [
    "setsid",
    "join the cgroups",
    "enter the network namespace",
    "open the tap device",
    "make mounts private",
    "mount the root tmpfs",
    "create the mount view",
    "bind a file or directory",
    "pivot_root",
    "mount proc",
    "set rlimits",
    "redirect stdio",
    "drop capabilities",
    "change uid and gid",
    "set no_new_privs / parent-death signal",
    "execute QEMU",
];

/// Everything `execve` and the child's steps read.
struct Exec<'a> {
    jail: &'a Prepared,
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    log: i32,
    devnull: i32,
    netns: Option<i32>,
    detached: bool,
    err: i32,
    tun: CString,
    ifr: libc::ifreq,
}

/// Starts `binary args` in the jail; returns QEMU's host pid and a pidfd for it.
pub(crate) fn spawn(
    jail: &Prepared,
    binary: &Path,
    args: &[String],
    log: &std::fs::File,
    netns: Option<&std::fs::File>,
    detached: bool,
) -> std::io::Result<(u32, OwnedFd)> {
    let c = |s: &[u8]| CString::new(s).map_err(|_| std::io::Error::other("an argument holds a NUL byte"));
    let path = c(std::os::unix::ffi::OsStrExt::as_bytes(binary.as_os_str()))?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(c(a.as_bytes())?);
    }
    let envp = vec![c(b"PATH=/usr/bin:/bin")?];
    let devnull = std::fs::File::open("/dev/null")?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"tap0") {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    let exec = Exec {
        jail,
        path,
        argv,
        envp,
        log: log.as_raw_fd(),
        devnull: devnull.as_raw_fd(),
        netns: netns.map(AsRawFd::as_raw_fd),
        detached,
        err: wr.as_raw_fd(),
        tun: c(b"/dev/net/tun")?,
        ifr,
    };
    let argv: Vec<*const libc::c_char> = exec.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = exec.envp.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();

    let mut pidfd: i32 = -1;
    let mut ca = CloneArgs {
        flags: (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut i32 as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM is fork(2) with namespaces: the child gets a copy of
    // this address space and returns 0 here; it then only runs `child`, which makes raw
    // system calls on `exec`, `argv` and `envp` (prepared above, alive in its copy) and
    // never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &mut ca as *mut CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if pid == 0 {
        // SAFETY: we are the child (see above).
        unsafe { child(&exec, argv.as_ptr(), envp.as_ptr()) }
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(wr);
    // SAFETY: clone3 stored a new descriptor owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unread tail of `buf`.
        let n = unsafe { libc::read(rd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    drop(devnull);
    if got == 0 {
        return Ok((pid as u32, pidfd));
    }
    let step = i32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let errno = i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
    // Reap the child (it exits right after reporting).
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    let e = std::io::Error::from_raw_os_error(errno);
    Err(std::io::Error::new(e.kind(), format!("jail: cannot {} ({e})", STEPS.get(step).copied().unwrap_or("?"))))
}

/// Reports step `step` failed with the current errno and exits.
unsafe fn fail(err: i32, step: usize) -> ! {
    // SAFETY: errno location is thread-local memory of this (copied) thread.
    let errno = unsafe { *libc::__errno_location() };
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(step as i32).to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write and _exit are async-signal-safe system calls.
    unsafe {
        libc::write(err, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The child between clone and exec. Every call here is a system call on memory prepared
/// before the clone, and none may take a lock: glibc's locks are in the state the parent's
/// other threads left them at the clone (its set*id wrappers are replaced by raw calls).
unsafe fn child(x: &Exec<'_>, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> ! {
    // SAFETY: each block below is one raw system call (async-signal-safe) on values that
    // live in this process's copy of the parent's memory; on failure `fail` exits.
    unsafe {
        let ck = |r: libc::c_int, step: usize| {
            if r < 0 {
                fail(x.err, step)
            }
        };
        if x.detached {
            ck(libc::setsid(), 0);
        } else {
            ck(libc::setpgid(0, 0), 0);
        }
        for fd in &x.jail.procs {
            ck(libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) as libc::c_int, 1);
        }
        if let Some(ns) = x.netns {
            ck(libc::setns(ns, libc::CLONE_NEWNET), 2);
        }
        if let Some(tap_fd) = x.jail.tap_fd {
            let fd = libc::open(x.tun.as_ptr(), libc::O_RDWR);
            ck(fd, 3);
            ck(libc::ioctl(fd, libc::TUNSETIFF, &x.ifr as *const libc::ifreq), 3);
            ck(libc::dup2(fd, tap_fd), 3);
            if fd != tap_fd {
                libc::close(fd);
            }
        }
        let null = std::ptr::null::<libc::c_char>();
        ck(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()), 4);
        ck(
            libc::mount(c"tmpfs".as_ptr(), x.jail.root.as_ptr(), c"tmpfs".as_ptr(), libc::MS_NOSUID, c"mode=0755,size=1m".as_ptr().cast()),
            5,
        );
        for op in &x.jail.ops {
            match op {
                Op::Dir(p) => ck(libc::mkdir(p.as_ptr(), 0o755), 6),
                Op::File(p) => {
                    let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                    ck(fd, 6);
                    libc::close(fd);
                }
                Op::Link { target, at } => ck(libc::symlink(target.as_ptr(), at.as_ptr()), 6),
                Op::Dev { at, mode, rdev, owned } => {
                    ck(libc::mknod(at.as_ptr(), libc::S_IFCHR | mode, *rdev), 6);
                    ck(libc::chmod(at.as_ptr(), *mode), 6);
                    if *owned {
                        ck(libc::chown(at.as_ptr(), x.jail.uid, x.jail.uid), 6);
                    }
                }
                Op::Bind { src, at, readonly, exec } => {
                    ck(libc::mount(src.as_ptr(), at.as_ptr(), null, libc::MS_BIND, std::ptr::null()), 7);
                    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
                    if *readonly {
                        flags |= libc::MS_RDONLY;
                    }
                    if !*exec {
                        // Only /usr (and a QEMU binary outside it) is ever executed.
                        flags |= libc::MS_NOEXEC;
                    }
                    ck(libc::mount(null, at.as_ptr(), null, flags, std::ptr::null()), 7);
                }
            }
        }
        ck(libc::chdir(x.jail.root.as_ptr()), 8);
        ck(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int, 8);
        ck(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), 8);
        ck(libc::chdir(c"/".as_ptr()), 8);
        ck(
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            9,
        );
        ck(
            libc::mount(null, c"/".as_ptr(), null, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID, std::ptr::null()),
            8,
        );
        let nofile = libc::rlimit { rlim_cur: x.jail.nofile, rlim_max: x.jail.nofile };
        ck(libc::setrlimit(libc::RLIMIT_NOFILE, &nofile), 10);
        let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        ck(libc::setrlimit(libc::RLIMIT_CORE, &zero), 10);
        ck(libc::dup2(x.devnull, 0), 11);
        ck(libc::dup2(x.log, 1), 11);
        ck(libc::dup2(x.log, 2), 11);
        for cap in 0..64 {
            // EINVAL past the kernel's last capability.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && *libc::__errno_location() != libc::EINVAL {
                fail(x.err, 12);
            }
        }
        ck(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), 12);
        // Raw system calls, not glibc's wrappers: in a multi-threaded process glibc makes
        // these a broadcast to every thread (`__nptl_setxid`), taking its thread-list lock;
        // this child came from a raw clone3 and has one thread, and a lock another thread
        // of the parent held at the clone is never released here (seen: a child parked on
        // that futex for ever, its parent waiting on `err`).
        let id = libc::c_long::from(x.jail.uid);
        ck(libc::syscall(libc::SYS_setgroups, 0 as libc::c_long, std::ptr::null::<libc::gid_t>()) as libc::c_int, 13);
        ck(libc::syscall(libc::SYS_setresgid, id, id, id) as libc::c_int, 13);
        ck(libc::syscall(libc::SYS_setresuid, id, id, id) as libc::c_int, 13);
        // After the uid change, which clears it. The parent is blocked reading `err`
        // until the exec, so it cannot have died before this.
        if !x.detached {
            ck(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0), 14);
        }
        ck(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 14);
        libc::execve(x.path.as_ptr(), argv, envp);
        fail(x.err, 15)
    }
}
