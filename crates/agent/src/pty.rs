//! Pseudo-terminals for interactive execs: allocation, size, foreground group, and an
//! async master end.
//!
//! The master and slave are opened close-on-exec, so no other exec started meanwhile
//! inherits them (the child gets the slave as its stdio, which clears the flag there).

use nix::fcntl::OFlag;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::unix::AsyncFd;

/// A new terminal pair of the given size: (master, slave).
pub fn open(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = nix::fcntl::open(name.as_str(), OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())?;
    // SAFETY: `open` returned a new descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // SAFETY: the master is a valid open descriptor; into_raw_fd hands over ownership.
    let master = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
    resize(master.as_raw_fd(), rows, cols)?;
    Ok((master, slave))
}

/// Sets the terminal's size (the kernel sends SIGWINCH to its foreground group).
pub fn resize(master: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `signal` to the terminal's foreground process group, as the line discipline does
/// for ^C — in one step in the kernel, so no group can vanish and its id be reused between
/// finding it and signalling it. False when the terminal has no foreground group.
pub fn signal_foreground(master: RawFd, signal: i32) -> bool {
    // SAFETY: TIOCSIG takes the signal number by value and touches no memory.
    unsafe { libc::ioctl(master, libc::TIOCSIG, signal as libc::c_ulong) == 0 }
}

/// Makes the child a session leader with its stdin (the slave) as controlling terminal.
/// Runs between fork and exec, so only async-signal-safe calls.
pub fn make_controlling() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe and touch only this process.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The master end, readable and writable without blocking the runtime.
pub struct Master(AsyncFd<OwnedFd>);

impl Master {
    /// Wraps a master descriptor (switching it to non-blocking mode).
    pub fn new(fd: OwnedFd) -> io::Result<Master> {
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // SAFETY: the OwnedFd is a valid descriptor that the AsyncFd owns and never
        // replaces or closes while registered.
        Ok(Master(unsafe { AsyncFd::register(fd)? }))
    }

    /// The raw descriptor, for ioctls.
    pub fn raw(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }

    /// Reads what the terminal's processes wrote; 0 once every slave descriptor is closed
    /// (Linux reports that as EIO).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` as terminal input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
