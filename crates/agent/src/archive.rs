//! Directories as tar streams (`hearth cp -r`): `GET /v1/archive?path=` packs a directory's
//! contents, `PUT /v1/archive?path=&size=` unpacks one into a new directory. The format and
//! its rules (relative paths only, links kept and never followed, bounded entries) are
//! [`hearth_proto::archive`]'s, the same code the CLI runs on the other end.
//!
//! Both run on a blocking thread, tied to the HTTP/2 stream by bounded queues: a reader
//! that stops reading stops the packing, and unpacking takes the body only as fast as the
//! disk does (the stream's flow-control window is what the host can send ahead).
//! An upload unpacks into a temporary directory beside the target, renamed into place
//! only once the whole body arrived and unpacked cleanly; otherwise it is removed.

use crate::files::{bad, check_space, path_param, query, rand_suffix};
use crate::server::{self, Body};
use bytes::Bytes;
use futures_util::TryStreamExt;
use hearth_proto::ErrorCode;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use std::io::Write;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Bytes gathered before a chunk goes to the host.
const CHUNK: usize = 256 << 10;

/// A `Write` that hands full chunks to a bounded queue, blocking while it is full (tar
/// writes through `std::io::Write`; tokio-util's bridges end a stream with a clean EOF on
/// failure, which could pass for a complete archive, so this sends the error itself).
struct ChunkWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the host stopped reading"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// `GET /v1/archive?path=`: directory `path`'s contents as a tar stream.
pub async fn read(req: Request<Incoming>) -> Response<Body> {
    let path = match path_param(&query(&req)) {
        Ok(p) => p,
        Err(r) => return r,
    };
    // Checked before the answer starts, so these are clean errors, not broken streams.
    match std::fs::symlink_metadata(&path) {
        Err(e) => return server::io_error(&format!("open {}", path.display()), &e),
        Ok(m) if !m.is_dir() => {
            return server::error(StatusCode::CONFLICT, ErrorCode::WrongKind, format!("{} is not a directory", path.display()))
        }
        Ok(_) => {}
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
        let r = hearth_proto::archive::pack(&path, &mut w).and_then(|_| w.flush());
        if let Err(e) = r {
            // The stream ends in an error, never in what could pass for a whole archive.
            let _ = tx.blocking_send(Err(e));
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/x-tar")
        .body(server::channel_body(rx))
        .expect("static response parts")
}

/// Removes the temporary directory unless the upload completed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `PUT /v1/archive?path=&size=`: unpacks the body (a tar stream) into the new directory
/// `path`; its parents are created. `size`, when given, is checked against the free space
/// first.
pub async fn write(req: Request<Incoming>) -> Response<Body> {
    let q = query(&req);
    let path = match path_param(&q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let size = match crate::files::param(&q, "size").map(str::parse::<u64>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad("size must be a number of bytes"),
    };
    let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
        return bad(format!("cannot unpack into {}", path.display()));
    };
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {
            return server::error(
                StatusCode::CONFLICT,
                ErrorCode::AlreadyExists,
                format!("{} already exists: a directory is unpacked into a new path", path.display()),
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return server::io_error(&format!("stat {}", path.display()), &e),
    }
    let parent = parent.to_path_buf();
    let tmp = parent.join(format!(".hearth-upload-{:016x}", rand_suffix()));
    let body = http_body_util::BodyStream::new(req.into_body())
        .map_err(std::io::Error::other)
        .try_filter_map(|f| futures_util::future::ready(Ok(f.into_data().ok())));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
    // Everything, the guard included, lives on the blocking thread: a host that resets the
    // stream drops this future, the body then fails, and the guard removes what was made.
    let done = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&parent).map_err(|e| (format!("create {}", parent.display()), e))?;
        if let Some(n) = size {
            check_space(&parent, n).map_err(|e| (format!("unpack into {}", path.display()), e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| (format!("create {}", tmp.display()), e))?;
        let mut guard = TempDir(Some(tmp.clone()));
        let stats = hearth_proto::archive::unpack(reader, &tmp).map_err(|e| (format!("unpack into {}", path.display()), e))?;
        let finish = || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
            // What was unpacked reaches the disk before it is in place (as a file write's).
            let d = std::fs::File::open(&tmp)?;
            nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)).map_err(std::io::Error::from)?;
            std::fs::rename(&tmp, &path)
        };
        finish().map_err(|e| (format!("unpack into {}", path.display()), e))?;
        guard.0 = None;
        Ok::<_, (String, std::io::Error)>(stats)
    })
    .await;
    match done {
        Ok(Ok(stats)) => server::json(StatusCode::OK, &stats),
        Ok(Err((what, e))) => server::io_error(&what, &e),
        Err(e) => server::error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Io, format!("unpack task failed: {e}")),
    }
}
