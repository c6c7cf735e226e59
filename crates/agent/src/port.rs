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
        // Writes block (EAGAIN) while the host is away. A write must never wait for the
        // host to come back: its bytes belong to the old connection and would corrupt the
        // next one. So a write that finds the host gone fails the connection instead.
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "host disconnected");
        // As for reads: do not trust readiness cleared while waiting for the host.
        match nix::unistd::write(self.fd.get_ref(), data) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(nix::errno::Errno::EAGAIN) => {
                if !host_connected(self.fd.get_ref())? {
                    return Poll::Ready(Err(gone()));
                }
            }
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {
                    if !host_connected(self.fd.get_ref())? {
                        return Poll::Ready(Err(gone()));
                    }
                }
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

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Outcome of scanning for a connection preface.
enum Scan {
    /// Found; these bytes (the preface and what followed it in the same read) start the
    /// new connection.
    Found(Vec<u8>),
    /// The host went away first.
    Eof,
}

/// Discards bytes until the HTTP/2 client preface has been read, answering the host's
/// resynchronisation probes on the way (see `hearth_proto::sync`).
///
/// The port has no connection boundaries of its own: leftovers of an old connection may
/// precede the new one. The host probes until answered and only then sends the preface,
/// so neither side mistakes old bytes for new ones. At most one read's worth is held.
async fn scan_for_preface<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) -> io::Result<Scan> {
    use hearth_proto::sync;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keep = PREFACE.len().max(sync::PROBE_LEN);
    let mut window: Vec<u8> = Vec::with_capacity(keep + 1);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) => return Ok(Scan::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(Scan::Eof),
            Err(e) => return Err(e),
        };
        for (i, &b) in buf[..n].iter().enumerate() {
            if window.len() == keep {
                window.remove(0);
            }
            window.push(b);
            if window.ends_with(PREFACE) {
                let mut start = PREFACE.to_vec();
                start.extend_from_slice(&buf[i + 1..n]);
                return Ok(Scan::Found(start));
            }
            if b == b'\n' && window.len() >= sync::PROBE_LEN {
                if let Some(nonce) = sync::parse_probe(&window[window.len() - sync::PROBE_LEN..]) {
                    match io.write_all(&sync::ready(nonce)).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(Scan::Eof),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

/// A byte stream that first replays `prefix`, then reads from `io`.
struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
        wait_for_host(&fd).await?;
        let mut io = PortIo { fd: fd.clone() };
        let start = match scan_for_preface(&mut io).await {
            Ok(Scan::Found(start)) => start,
            Ok(Scan::Eof) => continue,
            Err(e) => {
                eprintln!("hearth-agent: reading the port failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if debug {
            eprintln!("hearth-agent: host connected");
        }
        // One connection at a time: the port is a single pipe.
        let result = server::serve_connection(Prefixed { prefix: start, pos: 0, io }, state.clone()).await;
        if debug {
            eprintln!("hearth-agent: connection ended: {result:?}");
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Serves HTTP/2 on a unix socket (test mode, not PID 1).
pub async fn serve_unix(path: &str, state: Arc<State>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok(Scan::Found(start)) = scan_for_preface(&mut stream).await {
                let _ = server::serve_connection(Prefixed { prefix: start, pos: 0, io: stream }, state).await;
            }
        });
    }
}
