//! The byte pipe to the host and the connection loop over it.
//!
//! A virtio-serial port is one long-lived character device; "connections" are the host
//! opening and closing its end (QEMU's chardev socket). Linux reports the host's state
//! through the port: with the host gone, `poll` says `POLLHUP` and `read` returns 0. The
//! agent serves one connection at a time: it waits until the host is there, resynchronises
//! (see `scan_for_preface`), serves HTTP/2 until the connection ends, and starts over. The
//! port stays open throughout (closing it would tell QEMU the guest left).
//!
//! Each connection gets its own epoll registration of the port (a duplicate descriptor):
//! tokio treats a hang-up as final ("closed" readiness is never cleared), but here the
//! host's absence is temporary, so a registration that has seen one is retired with its
//! connection. Within a connection, a hang-up seen while a read or write would block ends
//! the connection.

use crate::server::{self, State};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Async reads and writes on the non-blocking port device, for one connection.
struct PortIo {
    fd: AsyncFd<OwnedFd>,
}

impl PortIo {
    /// A fresh registration of `port` (a duplicate descriptor).
    fn new(port: &OwnedFd) -> io::Result<PortIo> {
        let dup = port.try_clone()?;
        // SAFETY: the duplicate is moved into the AsyncFd, which owns it until dropped, so
        // the descriptor stays open and refers to the same port for the AsyncFd's life.
        let fd = unsafe { AsyncFd::register(dup) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PortIo { fd })
    }
}

impl AsyncRead for PortIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing to read after a hang-up: the host came back, so this connection
                // is over (and the closed readiness would otherwise wake us forever).
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
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
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {
                    if closed || !host_connected(self.fd.get_ref())? {
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
fn host_connected(fd: &impl AsFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_fd().as_raw_fd(), events: libc::POLLIN | libc::POLLOUT, revents: 0 };
    // SAFETY: `pfd` is a valid pollfd array of length 1 that lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents & libc::POLLHUP == 0)
}

/// Waits until the host has its end of the port open. While it is away the port reports a
/// hang-up continuously (nothing to wait on), so this polls every 5 ms: the host is only
/// ever away for moments (between connections), and never while the VM is idle-connected.
async fn wait_for_host(port: &OwnedFd) -> io::Result<()> {
    while !host_connected(port)? {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
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
    let file = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    let port = OwnedFd::from(file);
    let debug = std::fs::read_to_string("/proc/cmdline").unwrap_or_default().contains("hearth.debug");
    loop {
        wait_for_host(&port).await?;
        let mut io = PortIo::new(&port)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn scanning_skips_garbage_answers_probes_and_finds_the_preface() {
        let (mut host, mut guest) = tokio::io::duplex(1 << 16);
        let mut stream = Vec::new();
        stream.extend_from_slice(b"\x00\x00\x08\x07stale frame bytes of an old connection");
        stream.extend_from_slice(&hearth_proto::sync::probe(7));
        stream.extend_from_slice(b"more junk");
        stream.extend_from_slice(&hearth_proto::sync::probe(8));
        stream.extend_from_slice(PREFACE);
        stream.extend_from_slice(b"SETTINGS...");
        host.write_all(&stream).await.unwrap();
        let found = match scan_for_preface(&mut guest).await.unwrap() {
            Scan::Found(start) => start,
            Scan::Eof => panic!("EOF"),
        };
        assert!(found.starts_with(PREFACE));
        // Both probes were answered, in order.
        let mut answers = vec![0u8; 2 * hearth_proto::sync::READY_LEN];
        host.read_exact(&mut answers).await.unwrap();
        let mut want = hearth_proto::sync::ready(7);
        want.extend_from_slice(&hearth_proto::sync::ready(8));
        assert_eq!(answers, want);
    }

    #[tokio::test]
    async fn a_closed_pipe_while_scanning_is_eof() {
        let (host, mut guest) = tokio::io::duplex(64);
        drop(host);
        assert!(matches!(scan_for_preface(&mut guest).await.unwrap(), Scan::Eof));
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_on() {
        let (mut host, guest) = tokio::io::duplex(64);
        host.write_all(b" world").await.unwrap();
        drop(host);
        let mut p = Prefixed { prefix: b"hello".to_vec(), pos: 0, io: guest };
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
