//! The byte pipe to the host and the connection loop over it.
//!
//! A virtio-serial port is one long-lived character device; "connections" are the host
//! opening and closing its end (QEMU's chardev socket). Linux reports the host's state
//! through the port: with the host gone, `poll` says `POLLHUP` and `read` returns 0; when
//! the host (re)connects the port's wait queue is woken. So the agent serves one HTTP/2
//! connection until it sees end-of-file, then sleeps until the host is back and serves a
//! fresh one. The port stays open throughout (closing it would tell QEMU the guest left).

use crate::server::{self, State};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Async reads and writes on the non-blocking port device.
struct PortIo {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl AsyncRead for PortIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // Try the read before consulting readiness: `wait_for_host` may have cleared a
        // readiness event for bytes that were already queued, and edge-triggered epoll
        // would not announce them again.
        let unfilled = buf.initialize_unfilled();
        match nix::unistd::read(self.fd.get_ref().as_raw_fd(), unfilled) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // As for reads: do not trust readiness cleared while waiting for the host.
        match nix::unistd::write(self.fd.get_ref(), data) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// True when the host end of the port is open (no `POLLHUP`).
fn host_connected(fd: &OwnedFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN | libc::POLLOUT, revents: 0 };
    // SAFETY: `pfd` is a valid pollfd array of length 1 that lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents & libc::POLLHUP == 0)
}

/// Waits, without spinning, until the host has its end of the port open.
async fn wait_for_host(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    let interest = Interest::READABLE | Interest::WRITABLE;
    loop {
        if host_connected(fd.get_ref())? {
            return Ok(());
        }
        // Forget readiness cached from the last connection so the await below sleeps until
        // the port's wait queue is woken again (epoll is edge-triggered here), then look
        // once more in case the host arrived in between.
        if let Some(Ok(mut g)) = futures_util::FutureExt::now_or_never(fd.ready(interest)) {
            g.clear_ready();
        }
        if host_connected(fd.get_ref())? {
            return Ok(());
        }
        // The timeout is only a safety net should a wake-up ever be missed.
        let _ = tokio::time::timeout(Duration::from_secs(1), fd.ready(interest)).await;
    }
}

/// Serves the host on the virtio-serial port at `path`, forever.
pub async fn serve_port(path: &std::path::Path, state: Arc<State>) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped, so the
    // descriptor stays open and refers to the same port for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(OwnedFd::from(file)) }.map_err(|e| io::Error::other(e.to_string()))?;
    let fd = Arc::new(fd);
    let debug = std::fs::read_to_string("/proc/cmdline").unwrap_or_default().contains("hearth.debug");
    loop {
        if debug {
            eprintln!("hearth-agent: waiting for host on {}", path.display());
        }
        wait_for_host(&fd).await?;
        if debug {
            eprintln!("hearth-agent: host connected");
        }
        let io = PortIo { fd: fd.clone() };
        // One connection at a time: the port is a single pipe.
        let result = server::serve_connection(io, state.clone()).await;
        if debug {
            eprintln!("hearth-agent: connection ended: {result:?}");
        }
        if let Err(e) = result {
            if !e.is_closed_or_eof() {
                eprintln!("hearth-agent: connection ended: {e}");
            }
        }
        state.connection_closed();
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Serves HTTP/2 on a unix socket (test mode, not PID 1).
pub async fn serve_unix(path: &str, state: Arc<State>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let _ = server::serve_connection(stream, state).await;
        });
    }
}

trait ClosedExt {
    fn is_closed_or_eof(&self) -> bool;
}

impl ClosedExt for hyper::Error {
    fn is_closed_or_eof(&self) -> bool {
        self.is_closed() || self.is_incomplete_message() || self.to_string().contains("connection")
    }
}
