//! Code artifacts: the zip (or directory) a build starts from, with its `Dockerfile` at the
//! root. Archives come from users, so extraction trusts nothing: entry names are checked
//! (no absolute paths, no `..`), symbolic links may not point outside the tree, the number
//! of entries and the bytes actually written are capped (declared sizes can lie: a zip bomb
//! is stopped by what it writes, not what it claims), and a failure removes what was
//! extracted.
//!
//! [`fetch`] brings an artifact named by a URI onto the host first: local paths and
//! `file://` URIs are used in place; `http://` and `https://` bodies are downloaded into a
//! directory the caller owns, streamed chunk by chunk under the same byte limit (counted
//! on what arrives, since a Content-Length can lie or be absent), with connect and overall
//! timeouts and a bounded number of redirects. A failed download leaves no file behind.
//! Errors show the URI without its password and query string, which often carry
//! credentials (presigned URLs).

use crate::{io, RootfsError};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How long opening a connection to an artifact's server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole download (redirects, headers and body) may take.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Most redirects followed for one download.
pub const MAX_REDIRECTS: usize = 5;

/// Limits on one artifact.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes written in all.
    pub max_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: 1 << 30, max_entries: 100_000 }
    }
}

/// Why an artifact was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Not readable as a zip.
    #[error("{path} is not a zip archive: {reason}")]
    NotZip {
        /// The file.
        path: PathBuf,
        /// The reader's complaint.
        reason: String,
    },
    /// An entry would land outside the extraction directory.
    #[error("archive entry {0:?} points outside the archive (absolute path, `..` or a symlink escaping it)")]
    Escape(String),
    /// Too big, or too many entries.
    #[error("archive exceeds its limit: {0}")]
    TooLarge(String),
    /// No Dockerfile at the root.
    #[error("the code artifact has no Dockerfile at its root")]
    NoDockerfile,
    /// A URI scheme Hearth cannot fetch.
    #[error("unsupported code artifact location {0:?}: use a local path, a file://, http:// or https:// URI")]
    Scheme(String),
    /// An http(s) URI that does not parse.
    #[error("code artifact URI {uri} is not a valid URL: {reason}")]
    BadUri {
        /// The URI, password and query redacted.
        uri: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The server answered with a status other than 2xx (after redirects).
    #[error("fetching {uri} failed: the server answered HTTP {status}")]
    Status {
        /// The URI, password and query redacted.
        uri: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The body is larger than [`Limits::max_bytes`], by its Content-Length or by what
    /// arrived.
    #[error("{uri} is larger than the {limit}-byte limit on code artifacts")]
    DownloadTooLarge {
        /// The URI, password and query redacted.
        uri: String,
        /// The limit.
        limit: u64,
    },
    /// The download failed: no connection, a timeout, too many redirects, a broken transfer.
    #[error("fetching {uri} failed: {what}")]
    Fetch {
        /// The URI, password and query redacted.
        uri: String,
        /// What went wrong, in words.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// File trouble.
    #[error(transparent)]
    Io(#[from] RootfsError),
}

/// The local file or directory a code artifact location names (`/path`, `./path`,
/// `file:///path`).
pub fn locate(uri: &str) -> Result<PathBuf, ArtifactError> {
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if uri.contains("://") {
        return Err(ArtifactError::Scheme(uri.to_owned()));
    }
    Ok(PathBuf::from(uri))
}

/// The local file or directory for a code artifact location, downloading it first when it
/// is an `http://` or `https://` URI.
///
/// Local paths and `file://` URIs are returned as [`locate`] returns them, without
/// touching `work`. An http(s) body is streamed into a new file inside `work` (a directory
/// that must exist and that the caller owns and removes) whose path is returned; its name
/// says nothing about its content, so callers decide what it is (a zip, usually).
///
/// The download follows at most [`MAX_REDIRECTS`] redirects, gives up after
/// [`CONNECT_TIMEOUT`] without a connection or [`DOWNLOAD_TIMEOUT`] in all, and honours the
/// usual `HTTPS_PROXY`/`NO_PROXY` environment variables.
///
/// # Errors
///
/// [`ArtifactError::Scheme`] for other schemes (`s3://`, `ftp://`...),
/// [`ArtifactError::BadUri`], [`ArtifactError::Status`] for a non-2xx answer,
/// [`ArtifactError::DownloadTooLarge`] when the body (declared or received) exceeds
/// `limits.max_bytes`, [`ArtifactError::Fetch`] for network trouble and timeouts,
/// [`ArtifactError::Io`] when the file cannot be written. After an error nothing of the
/// download is left in `work`.
///
/// # Example
///
/// ```no_run
/// # async fn example() -> Result<(), hearth_image::artifact::ArtifactError> {
/// let work = tempfile::tempdir().expect("temp dir");
/// let zip = hearth_image::artifact::fetch("https://example.invalid/app.zip", work.path(), Default::default()).await?;
/// assert!(zip.starts_with(work.path()));
/// # Ok(()) }
/// ```
pub async fn fetch(uri: &str, work: &Path, limits: Limits) -> Result<PathBuf, ArtifactError> {
    match uri.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => {
            let client = http_client().build().map_err(|e| fetch_error(&redact(uri), e))?;
            download(&client, uri, work, limits).await
        }
        _ => locate(uri),
    }
}

/// The HTTP client settings of [`fetch`].
fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(DOWNLOAD_TIMEOUT)
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
}

/// `uri` for messages: no user or password, no query (tokens travel in the user name,
/// presigned URLs carry their signature in the query).
fn redact(uri: &str) -> String {
    if let Ok(mut url) = reqwest::Url::parse(uri) {
        let _ = url.set_username("");
        let _ = url.set_password(None);
        if url.query().is_some() {
            url.set_query(Some("..."));
        }
        url.set_fragment(None);
        return url.to_string();
    }
    // Unparseable: the same by hand, roughly.
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let authority_end = rest[..end].find('/').unwrap_or(end);
    let start = rest[..authority_end].rfind('@').map_or(0, |i| i + 1);
    let mut shown = format!("{scheme}://{}", &rest[start..end]);
    if end < rest.len() {
        shown.push_str("?...");
    }
    shown
}

fn fetch_error(uri: &str, e: reqwest::Error) -> ArtifactError {
    let what = if e.is_connect() && e.is_timeout() {
        format!("no connection within {} s", CONNECT_TIMEOUT.as_secs())
    } else if e.is_timeout() {
        format!("the download did not finish within {} s", DOWNLOAD_TIMEOUT.as_secs())
    } else if e.is_redirect() {
        format!("could not follow its redirects (at most {MAX_REDIRECTS}, to http or https only)")
    } else if e.is_connect() {
        "could not connect to the server".to_owned()
    } else if e.is_builder() {
        "the HTTP client could not be set up".to_owned()
    } else {
        "the transfer broke off".to_owned()
    };
    // The client's own message repeats the full URL, secrets included.
    ArtifactError::Fetch { uri: uri.to_owned(), what, source: Box::new(e.without_url()) }
}

/// Downloads `uri` into a new file inside `work` (see [`fetch`]).
async fn download(client: &reqwest::Client, uri: &str, work: &Path, limits: Limits) -> Result<PathBuf, ArtifactError> {
    let shown = redact(uri);
    let url = reqwest::Url::parse(uri).map_err(|e| ArtifactError::BadUri { uri: shown.clone(), reason: e.to_string() })?;
    let mut response = client.get(url).send().await.map_err(|e| fetch_error(&shown, e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(ArtifactError::Status { uri: shown, status: status.as_u16() });
    }
    let too_large = || ArtifactError::DownloadTooLarge { uri: shown.clone(), limit: limits.max_bytes };
    if response.content_length().is_some_and(|n| n > limits.max_bytes) {
        return Err(too_large());
    }
    let (file, path) = tempfile::Builder::new()
        .prefix("artifact-")
        .tempfile_in(work)
        .map_err(io(format!("create a download file in {}", work.display())))?
        .into_parts();
    // From here every early return drops `path`, which removes the partial file.
    let mut file = tokio::fs::File::from_std(file);
    let what = || format!("write {}", path.display());
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| fetch_error(&shown, e))? {
        received += chunk.len() as u64;
        if received > limits.max_bytes {
            return Err(too_large());
        }
        file.write_all(&chunk).await.map_err(io(what()))?;
    }
    // A tokio file finishes its last write in the background until flushed.
    file.flush().await.map_err(io(what()))?;
    drop(file);
    path.keep().map_err(|e| ArtifactError::Io(RootfsError::Io { what: format!("keep {}", e.path.display()), source: e.error }))
}

/// `name` as a relative path with no `..`, root or prefix components.
fn safe_relative(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// True when a symlink at `link` (relative to the root) with `target` stays inside.
fn link_stays_inside(link: &Path, target: &str) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in Path::new(target).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Extracts `zip` into the new directory `dest` (which must not exist). On any error
/// nothing of `dest` remains.
pub fn extract_zip(zip: &Path, dest: &Path, limits: Limits) -> Result<u64, ArtifactError> {
    let file = std::fs::File::open(zip).map_err(|e| RootfsError::Io { what: format!("open {}", zip.display()), source: e })?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| ArtifactError::NotZip { path: zip.to_path_buf(), reason: e.to_string() })?;
    if archive.len() > limits.max_entries {
        return Err(ArtifactError::TooLarge(format!("{} entries; the limit is {}", archive.len(), limits.max_entries)));
    }
    std::fs::create_dir(dest).map_err(io(format!("create {}", dest.display())))?;
    let result = extract_entries(&mut archive, dest, limits);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn extract_entries(archive: &mut zip::ZipArchive<std::fs::File>, dest: &Path, limits: Limits) -> Result<u64, ArtifactError> {
    let mut written = 0u64;
    let mut has_dockerfile = false;
    for i in 0..archive.len() {
        let mut entry =
            archive.by_index(i).map_err(|e| ArtifactError::NotZip { path: dest.to_path_buf(), reason: e.to_string() })?;
        let name = entry.name().to_owned();
        let rel = safe_relative(&name).ok_or_else(|| ArtifactError::Escape(name.clone()))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let out = dest.join(&rel);
        if rel == Path::new("Dockerfile") && !entry.is_dir() {
            has_dockerfile = true;
        }
        if entry.is_dir() {
            std::fs::create_dir_all(&out).map_err(io(format!("create {}", out.display())))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        if entry.is_symlink() {
            let mut target = String::new();
            (&mut entry).take(4096).read_to_string(&mut target).map_err(|_| ArtifactError::Escape(name.clone()))?;
            if !link_stays_inside(&rel, &target) {
                return Err(ArtifactError::Escape(name));
            }
            std::os::unix::fs::symlink(&target, &out).map_err(io(format!("link {}", out.display())))?;
            continue;
        }
        let budget = limits.max_bytes - written;
        let mut f = std::fs::File::create(&out).map_err(io(format!("create {}", out.display())))?;
        let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut f).map_err(io(format!("extract {name}")))?;
        if n > budget {
            return Err(ArtifactError::TooLarge(format!("more than {} bytes uncompressed", limits.max_bytes)));
        }
        written += n;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode & 0o755));
        }
    }
    if !has_dockerfile {
        return Err(ArtifactError::NoDockerfile);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn make_zip(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        for (name, data) in entries {
            w.start_file(*name, SimpleFileOptions::default()).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        f
    }

    #[test]
    fn a_good_archive_extracts() {
        let z = make_zip(&[("Dockerfile", b"FROM busybox\n"), ("src/app.py", b"print(1)\n")]);
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ctx");
        assert_eq!(extract_zip(z.path(), &out, Limits::default()).unwrap(), 22);
        assert_eq!(std::fs::read(out.join("src/app.py")).unwrap(), b"print(1)\n");
    }

    #[test]
    fn traversal_is_refused_and_nothing_is_left() {
        for bad in ["../evil", "/etc/passwd", "a/../../evil"] {
            let z = make_zip(&[("Dockerfile", b"FROM busybox\n"), (bad, b"x")]);
            let d = tempfile::tempdir().unwrap();
            let out = d.path().join("ctx");
            let e = extract_zip(z.path(), &out, Limits::default()).unwrap_err();
            assert!(matches!(e, ArtifactError::Escape(_)), "{bad}: {e}");
            assert!(!out.exists(), "{bad}: partial extraction left behind");
        }
    }

    #[test]
    fn escaping_symlinks_are_refused() {
        assert!(link_stays_inside(Path::new("a/b"), "../c"));
        assert!(!link_stays_inside(Path::new("a/b"), "../../c"));
        assert!(!link_stays_inside(Path::new("a"), "/etc/passwd"));
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        w.start_file("Dockerfile", SimpleFileOptions::default()).unwrap();
        w.write_all(b"FROM busybox\n").unwrap();
        w.add_symlink("link", "../../etc/shadow", SimpleFileOptions::default()).unwrap();
        w.finish().unwrap();
        let d = tempfile::tempdir().unwrap();
        let e = extract_zip(f.path(), &d.path().join("ctx"), Limits::default()).unwrap_err();
        assert!(matches!(e, ArtifactError::Escape(_)), "{e}");
    }

    #[test]
    fn bombs_and_missing_dockerfiles_are_refused() {
        // 64 MiB of zeros compresses to a few KiB; the limit is on what is written.
        let zeros = vec![0u8; 64 << 20];
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(f.reopen().unwrap());
        w.start_file("Dockerfile", SimpleFileOptions::default()).unwrap();
        w.write_all(b"FROM busybox\n").unwrap();
        w.start_file("bomb", SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated)).unwrap();
        w.write_all(&zeros).unwrap();
        w.finish().unwrap();
        assert!(std::fs::metadata(f.path()).unwrap().len() < 1 << 20);
        let d = tempfile::tempdir().unwrap();
        let e = extract_zip(f.path(), &d.path().join("ctx"), Limits { max_bytes: 16 << 20, max_entries: 10 }).unwrap_err();
        assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");

        let z = make_zip(&[("app.py", b"x")]);
        let e = extract_zip(z.path(), &d.path().join("ctx2"), Limits::default()).unwrap_err();
        assert!(matches!(e, ArtifactError::NoDockerfile), "{e}");
        let e = extract_zip(z.path(), &d.path().join("ctx3"), Limits { max_bytes: 1 << 20, max_entries: 0 }).unwrap_err();
        assert!(matches!(e, ArtifactError::TooLarge(_)), "{e}");
    }

    /// An HTTP/1.1 server on 127.0.0.1 answering every request with `respond(path)`, raw
    /// bytes written as they are, then closing the connection. Returns its base URL.
    async fn serve(respond: fn(&str) -> Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&request).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    // The client may hang up early (a refused body): ignore write errors.
                    let _ = conn.write_all(&respond(&path)).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        base
    }

    fn response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\n{headers}\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn with_length(body: &[u8]) -> Vec<u8> {
        response("200 OK", &format!("Content-Length: {}\r\n", body.len()), body)
    }

    fn chunked(chunks: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for c in chunks {
            body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            body.extend_from_slice(c);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        response("200 OK", "Transfer-Encoding: chunked\r\n", &body)
    }

    fn routes(path: &str) -> Vec<u8> {
        match path {
            "/app.zip" => with_length(b"0123456789"),
            "/moved" => response("302 Found", "Location: /app.zip\r\nContent-Length: 0\r\n", b""),
            "/loop" => response("302 Found", "Location: /loop\r\nContent-Length: 0\r\n", b""),
            "/declared-big" => with_length(&[7u8; 11]),
            "/chunked-big" => chunked(&[&[1u8; 6], &[2u8; 6]]),
            "/chunked-ok" => chunked(&[&[1u8; 5], &[2u8; 5]]),
            // No length at all: the body ends when the connection closes.
            "/close-big" => response("200 OK", "", &[3u8; 11]),
            "/truncated" => response("200 OK", "Content-Length: 10\r\n", b"01234"),
            "/error" => response("500 Internal Server Error", "Content-Length: 0\r\n", b""),
            _ => response("404 Not Found", "Content-Length: 9\r\n", b"not found"),
        }
    }

    async fn get(base: &str, path: &str, work: &Path) -> Result<PathBuf, ArtifactError> {
        // No proxy, whatever the environment says: the server is on loopback.
        let client = http_client().no_proxy().build().unwrap();
        download(&client, &format!("{base}{path}"), work, Limits { max_bytes: 10, max_entries: 10 }).await
    }

    fn is_empty(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().next().is_none()
    }

    #[tokio::test]
    async fn downloads_land_in_the_work_directory() {
        let base = serve(routes).await;
        let work = tempfile::tempdir().unwrap();
        for path in ["/app.zip", "/moved", "/chunked-ok"] {
            let file = get(&base, path, work.path()).await.unwrap();
            assert!(file.starts_with(work.path()), "{path}: {}", file.display());
            assert_eq!(std::fs::metadata(&file).unwrap().len(), 10, "{path}");
        }
        let file = get(&base, "/app.zip", work.path()).await.unwrap();
        assert_eq!(std::fs::read(file).unwrap(), b"0123456789");
    }

    #[tokio::test]
    async fn failed_downloads_say_why_and_leave_nothing() {
        let base = serve(routes).await;
        let work = tempfile::tempdir().unwrap();
        let e = get(&base, "/missing", work.path()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Status { status: 404, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("404") && msg.contains(&format!("{base}/missing")), "{msg}");
        let e = get(&base, "/error", work.path()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Status { status: 500, .. }), "{e}");
        for path in ["/declared-big", "/chunked-big", "/close-big"] {
            let e = get(&base, path, work.path()).await.unwrap_err();
            assert!(matches!(e, ArtifactError::DownloadTooLarge { limit: 10, .. }), "{path}: {e}");
            assert!(is_empty(work.path()), "{path}: partial download left behind");
        }
        let e = get(&base, "/truncated", work.path()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Fetch { .. }), "{e}");
        let e = get(&base, "/loop", work.path()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Fetch { ref what, .. } if what.contains("redirect")), "{e}");
        assert!(is_empty(work.path()), "partial download left behind");
    }

    #[tokio::test]
    async fn unreachable_servers_and_bad_uris_are_errors() {
        // Bind then drop: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let work = tempfile::tempdir().unwrap();
        let e = get(&format!("http://127.0.0.1:{port}"), "/a.zip", work.path()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Fetch { .. }), "{e}");
        let e = fetch("http://[::1", work.path(), Limits::default()).await.unwrap_err();
        assert!(matches!(e, ArtifactError::BadUri { .. }), "{e}");
        assert!(is_empty(work.path()));
    }

    #[tokio::test]
    async fn fetch_uses_local_paths_in_place_and_refuses_other_schemes() {
        let work = tempfile::tempdir().unwrap();
        assert_eq!(fetch("/tmp/a.zip", work.path(), Limits::default()).await.unwrap(), PathBuf::from("/tmp/a.zip"));
        assert_eq!(fetch("file:///tmp/a.zip", work.path(), Limits::default()).await.unwrap(), PathBuf::from("/tmp/a.zip"));
        for uri in ["s3://bucket/a.zip", "ftp://host/a.zip", "gs://b/a.zip"] {
            let e = fetch(uri, work.path(), Limits::default()).await.unwrap_err();
            assert!(matches!(e, ArtifactError::Scheme(_)), "{uri}: {e}");
            assert!(e.to_string().contains("https://"), "{e}");
        }
        assert!(is_empty(work.path()));
    }

    #[test]
    fn secrets_stay_out_of_messages() {
        assert_eq!(redact("https://user:hunter2@host.invalid/a.zip?X-Sig=abc#f"), "https://host.invalid/a.zip?...");
        assert_eq!(redact("https://token@host.invalid/a.zip"), "https://host.invalid/a.zip");
        assert_eq!(redact("https://host.invalid/a.zip"), "https://host.invalid/a.zip");
        assert_eq!(redact("http://u:p@[::1/a@b?sig"), "http://[::1/a@b?...");
    }

    #[test]
    fn locations() {
        assert_eq!(locate("file:///tmp/a.zip").unwrap(), PathBuf::from("/tmp/a.zip"));
        assert_eq!(locate("./a.zip").unwrap(), PathBuf::from("./a.zip"));
        assert!(matches!(locate("s3://bucket/a.zip"), Err(ArtifactError::Scheme(_))));
    }
}
