//! Requests hyper cannot parse (a URI over its limit: 414; too many or too large header
//! fields: 431; broken framing such as two Content-Lengths: 400) are answered by hyper
//! itself, before any handler runs, with an empty body and no error code; an AWS client
//! then sees an error without a code. hyper has no hook for these answers, so each
//! connection's write side is wrapped ([`Guarded`]): an answer hyper wrote of its own —
//! exactly a 4xx status line, `connection: close`, `content-length: 0` and `date`, and
//! nothing else — is replaced by the same status in the service's error form
//! (`x-amzn-ErrorType` and a JSON `message`). Every other byte passes through unchanged.
//!
//! Handlers never write that exact head: their errors carry `content-type` and
//! `x-amzn-errortype`, and proxied answers never start with `connection: close` (a
//! hop-by-hop header the proxy drops).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose hyper-made error answers carry the service's error form.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    /// A replacement answer still to be written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
}

impl<IO> Guarded<IO> {
    /// Wraps `io`.
    pub fn new(io: IO) -> Self {
        Guarded { io, pending: None }
    }
}

/// The service's form of an answer hyper made of its own, or `None` when `head` is not one.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let (status_line, rest) = rest.split_once("\r\n")?;
    let date = rest.strip_prefix("connection: close\r\ncontent-length: 0\r\ndate: ")?.strip_suffix("\r\n\r\n")?;
    if date.contains('\r') || date.contains('\n') {
        return None;
    }
    let code: u16 = status_line.get(..3)?.parse().ok()?;
    let (kind, message) = match code {
        414 => ("UriTooLongException", "the request URI is over this API's limit"),
        431 => ("RequestHeaderFieldsTooLargeException", "the request has too many header fields, or one too large"),
        400 => ("BadRequestException", "the request is not well-formed HTTP/1.1 (its framing or a header is broken)"),
        _ => return None,
    };
    let body = serde_json::json!({ "message": message }).to_string();
    Some(
        format!(
            "HTTP/1.1 {status_line}\r\nconnection: close\r\ncontent-type: application/json\r\nx-amzn-errortype: {kind}\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<IO: AsyncWrite + Unpin> Guarded<IO> {
    /// Writes what is left of a replacement answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((buf, done)) = &mut self.pending {
            if *done == buf.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &buf[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        // hyper's own answers are short; only those are looked at.
        if buf.len() < 160 && buf.starts_with(b"HTTP/1.1 4") {
            if let Some(r) = replacement(buf) {
                self.pending = Some((r, 0));
                // Written as far as it goes now; flush and shutdown write the rest.
                if let Poll::Ready(Err(e)) = self.drain(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(buf.len()));
            }
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A listener whose connections are [`Guarded`].
#[derive(Debug)]
pub struct GuardedListener<L>(pub L);

impl<L: axum::serve::Listener> axum::serve::Listener for GuardedListener<L> {
    type Io = Guarded<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (Guarded::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DATE: &str = "Mon, 30 Nov 2026 07:27:04 GMT";

    #[test]
    fn only_hypers_own_answers_are_replaced() {
        for (status, kind) in [
            ("414 URI Too Long", "UriTooLongException"),
            ("431 Request Header Fields Too Large", "RequestHeaderFieldsTooLargeException"),
            ("400 Bad Request", "BadRequestException"),
        ] {
            let head = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n");
            let r = String::from_utf8(replacement(head.as_bytes()).unwrap()).unwrap();
            assert!(r.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{r}");
            assert!(r.contains(&format!("x-amzn-errortype: {kind}\r\n")), "{r}");
            let body = r.split_once("\r\n\r\n").unwrap().1;
            assert!(r.contains(&format!("content-length: {}\r\n", body.len())), "{r}");
            assert!(serde_json::from_str::<serde_json::Value>(body).unwrap()["message"].is_string());
        }
        // A handler's answers, a body, other statuses: untouched.
        for other in [
            format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n{{}}"),
            format!("HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"),
            format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"),
        ] {
            assert!(replacement(other.as_bytes()).is_none(), "{other}");
        }
    }

    #[tokio::test]
    async fn a_guarded_stream_writes_the_replacement_whole() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut g = Guarded::new(a);
        let head = format!("HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n");
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            b.read_to_end(&mut out).await.unwrap();
            out
        });
        g.write_all(head.as_bytes()).await.unwrap();
        g.write_all(b"after").await.unwrap();
        g.shutdown().await.unwrap();
        drop(g);
        let out = String::from_utf8(reader.await.unwrap()).unwrap();
        assert!(out.contains("x-amzn-errortype: UriTooLongException") && out.ends_with("}after"), "{out}");
    }
}
