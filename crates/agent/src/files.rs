//! File transfer and filesystem operations.
//!
//! Reads stream the file in chunks; writes stream the request body into a temporary file
//! beside the target and rename it into place, so a reader never sees half a file and a
//! failed upload leaves nothing behind.

use crate::server::{self, Body};
use bytes::Bytes;
use hearth_proto::binpath::BinPath;
use hearth_proto::files::{FileInfo, FileKind, FsRequest, FsResponse, MAX_LIST_ENTRIES};
use hearth_proto::ErrorCode;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const CHUNK: usize = 256 << 10;

pub(crate) fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

pub(crate) fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub(crate) fn bad(msg: impl Into<String>) -> Response<Body> {
    server::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, msg)
}

pub(crate) fn path_param(q: &[(String, String)]) -> Result<PathBuf, Response<Body>> {
    let raw = param(q, "path").ok_or_else(|| bad("missing path"))?;
    let p = BinPath::from_query(raw).map_err(|e| bad(e.to_string()))?;
    to_path(&p)
}

fn to_path(p: &BinPath) -> Result<PathBuf, Response<Body>> {
    p.validate().map_err(|e| bad(e.to_string()))?;
    if p.as_bytes()[0] != b'/' {
        return Err(bad(format!("path must be absolute: {}", p.display())));
    }
    Ok(PathBuf::from(OsStr::from_bytes(p.as_bytes())))
}

fn num<T: std::str::FromStr>(q: &[(String, String)], key: &str) -> Result<Option<T>, Response<Body>> {
    param(q, key).map(|v| v.parse::<T>().map_err(|_| bad(format!("invalid {key}: {v:?}")))).transpose()
}

/// `GET /v1/files?path=&offset=&length=`: streams (a range of) a file.
pub async fn read(req: Request<Incoming>) -> Response<Body> {
    let q = query(&req);
    let path = match path_param(&q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (offset, length) = match (num::<u64>(&q, "offset"), num::<u64>(&q, "length")) {
        (Ok(o), Ok(l)) => (o.unwrap_or(0), l),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    // O_NONBLOCK so that opening a FIFO cannot hang; regular files ignore the flag.
    let mut file = match tokio::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).await {
        Ok(f) => f,
        Err(e) => return server::io_error(&format!("open {}", path.display()), &e),
    };
    let meta = match file.metadata().await {
        Ok(m) => m,
        Err(e) => return server::io_error("stat", &e),
    };
    if !meta.is_file() {
        return server::error(StatusCode::CONFLICT, ErrorCode::WrongKind, format!("{} is not a regular file", path.display()));
    }
    if offset > 0 {
        if let Err(e) = file.seek(std::io::SeekFrom::Start(offset)).await {
            return server::io_error("seek", &e);
        }
    }
    let total = meta.len().saturating_sub(offset);
    let mut remaining = length.map_or(total, |l| l.min(total));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        while remaining > 0 {
            let want = (remaining as usize).min(CHUNK);
            match file.read(&mut buf[..want]).await {
                Ok(0) => break,
                Ok(n) => {
                    remaining -= n as u64;
                    if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(server::channel_body(rx))
        .expect("static response parts")
}

/// Removes the temporary file unless the write completed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Refuses `size` bytes more on the filesystem of `dir` when its free space (for an
/// unprivileged user: what is left once root's reserve is set aside) is smaller.
pub(crate) fn check_space(dir: &Path, size: u64) -> std::io::Result<()> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    // Their C types differ between targets (u64 on some, c_ulong on others).
    #[allow(clippy::unnecessary_cast)]
    let free = (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64);
    if size > free {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("{size} bytes do not fit: {} has {free} bytes free", dir.display()),
        ));
    }
    Ok(())
}

/// `PUT /v1/files?path=&mode=&size=`: streams the body into the file, atomically. `size`,
/// when given, is checked against the free space before anything is written.
pub async fn write(req: Request<Incoming>) -> Response<Body> {
    let q = query(&req);
    let path = match path_param(&q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let size = match param(&q, "size").map(str::parse::<u64>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad("size must be a number of bytes"),
    };
    let mode = match param(&q, "mode").map(|m| u32::from_str_radix(m, 8)) {
        None => 0o644,
        Some(Ok(m)) if m <= 0o7777 => m,
        Some(_) => return bad("mode must be octal, at most 7777"),
    };
    let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
        return bad(format!("cannot write to {}", path.display()));
    };
    // A short fixed-length name, whatever the target's length (NAME_MAX is 255 bytes).
    let tmp = dir.join(format!(".hearth-upload-{:016x}", rand_suffix()));
    // Created with its guard on the blocking thread: when the host resets the stream, hyper
    // drops this future, maybe while the file is being created; the guard then comes back
    // to a dropped join handle and is dropped there, so the file never outlives the request
    // (creating it in a future that can be dropped mid-open left it behind).
    let (dir, tmp2, path2) = (dir.to_path_buf(), tmp.clone(), path.clone());
    let created = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| (format!("create {}", dir.display()), e))?;
        if let Some(n) = size {
            check_space(&dir, n).map_err(|e| (format!("write {}", path2.display()), e))?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp2)
            .map_err(|e| (format!("create {}", tmp2.display()), e))?;
        Ok::<_, (String, std::io::Error)>((f, TempGuard(Some(tmp2))))
    })
    .await;
    let (mut file, mut guard) = match created {
        Ok(Ok((f, g))) => (tokio::fs::File::from_std(f), g),
        Ok(Err((what, e))) => return server::io_error(&what, &e),
        Err(e) => return server::error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Io, format!("create task failed: {e}")),
    };
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    if let Err(e) = file.write_all(&data).await {
                        return server::io_error(&format!("write {}", path.display()), &e);
                    }
                }
            }
            Err(e) => return bad(format!("upload interrupted: {e}")),
        }
    }
    let done = async {
        file.flush().await?;
        file.sync_all().await?;
        tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).await?;
        tokio::fs::rename(&tmp, &path).await
    };
    if let Err(e) = done.await {
        return server::io_error(&format!("write {}", path.display()), &e);
    }
    guard.0 = None;
    match stat(&path, BinPath(path.as_os_str().as_bytes().to_vec())) {
        Ok(info) => server::json(StatusCode::OK, &info),
        Err(e) => server::io_error("stat", &e),
    }
}

pub(crate) fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    NEXT.fetch_add(1, Ordering::Relaxed) ^ (u64::from(nanos) << 20)
}

fn stat(path: &Path, name: BinPath) -> std::io::Result<FileInfo> {
    let m = std::fs::symlink_metadata(path)?;
    let ft = m.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    Ok(FileInfo { path: name, kind, size: m.len(), mode: m.mode() & 0o7777, mtime: m.mtime(), uid: m.uid(), gid: m.gid() })
}

/// `POST /v1/fs/{op}`.
pub async fn fs_op(req: Request<Incoming>) -> Response<Body> {
    let op = req.uri().path().trim_start_matches("/v1/fs/").to_owned();
    let request: FsRequest = match server::read_json(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if request.op_name() != op {
        return bad(format!("operation {op:?} does not match the body's {:?}", request.op_name()));
    }
    let result = tokio::task::spawn_blocking(move || run_fs(request)).await;
    match result {
        Ok(Ok(resp)) => server::json(StatusCode::OK, &resp),
        Ok(Err(resp)) => resp,
        Err(e) => server::error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Io, format!("fs task failed: {e}")),
    }
}

fn run_fs(request: FsRequest) -> Result<FsResponse, Response<Body>> {
    let ioe = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e: std::io::Error| server::io_error(&what, &e)
    };
    match request {
        FsRequest::Stat { path } => {
            let p = to_path(&path)?;
            stat(&p, path).map(FsResponse::Info).map_err(ioe("stat", &p))
        }
        FsRequest::List { path } => {
            let p = to_path(&path)?;
            let mut entries = Vec::new();
            for e in std::fs::read_dir(&p).map_err(ioe("list", &p))? {
                let e = e.map_err(ioe("list", &p))?;
                if entries.len() >= MAX_LIST_ENTRIES {
                    return Err(bad(format!("{} has more than {MAX_LIST_ENTRIES} entries", p.display())));
                }
                let name = BinPath(e.file_name().as_bytes().to_vec());
                entries.push(stat(&e.path(), name).map_err(ioe("stat", &e.path()))?);
            }
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(FsResponse::Entries(entries))
        }
        FsRequest::Mkdir { path, parents, mode } => {
            let p = to_path(&path)?;
            let mut b = std::fs::DirBuilder::new();
            b.recursive(parents).mode(mode.unwrap_or(0o755) & 0o7777);
            b.create(&p).map_err(ioe("mkdir", &p))?;
            stat(&p, path).map(FsResponse::Info).map_err(ioe("stat", &p))
        }
        FsRequest::Remove { path, recursive } => {
            let p = to_path(&path)?;
            let m = std::fs::symlink_metadata(&p).map_err(ioe("remove", &p))?;
            if m.is_dir() {
                if recursive {
                    std::fs::remove_dir_all(&p).map_err(ioe("remove", &p))?;
                } else {
                    std::fs::remove_dir(&p).map_err(ioe("remove", &p))?;
                }
            } else {
                std::fs::remove_file(&p).map_err(ioe("remove", &p))?;
            }
            Ok(FsResponse::Done)
        }
        FsRequest::Rename { from, to } => {
            let f = to_path(&from)?;
            let t = to_path(&to)?;
            std::fs::rename(&f, &t).map_err(ioe("rename", &f))?;
            stat(&t, to).map(FsResponse::Info).map_err(ioe("stat", &t))
        }
    }
}
