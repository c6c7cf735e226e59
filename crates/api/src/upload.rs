//! Code artifact uploads (`POST /hearth/v1/artifacts`): how a tenant hands the daemon a
//! build context without naming a host path. `hearth images create NAME ./dir` zips the
//! directory and uploads it here; CreateMicrovmImage then names it as
//! `hearth://artifacts/<sha256>`.
//!
//! The body is streamed to a file in the tenant's own area (`<state>/artifacts/<account>/`),
//! never buffered: the request is authenticated *before* a byte is read, with SigV4 over the
//! body's SHA-256 as the client claims it in `X-Amz-Content-Sha256`; what arrives is hashed
//! on the way and kept only when it matches the claim, so an upload is exactly what its
//! signer sent. Uploads are content-addressed (the same zip uploaded twice is one file),
//! bounded by the account's `artifact-bytes` quota ([`crate::quota`]; 32 GiB by default)
//! and the host's disk reserve, and removed [`UPLOAD_TTL`] after they arrive.

use crate::error::{ApiError, Kind};
use crate::service::Service;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How long an upload is kept: long enough for the build that names it to start (builds
/// read it when they start, within seconds), short enough that nothing piles up.
pub const UPLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the client may leave the upload silent before it is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The URI prefix CreateMicrovmImage accepts for uploads.
pub const URI_PREFIX: &str = "hearth://artifacts/";

/// The tenant's upload area.
pub fn dir(svc: &Service, account: &str) -> PathBuf {
    svc.state.join("artifacts").join(account)
}

/// The file an upload URI names for `account`, when it is one of that account's uploads
/// still kept. `None` for anything else (a malformed id names nothing).
pub fn resolve(svc: &Service, account: &str, uri: &str) -> Option<PathBuf> {
    let id = uri.strip_prefix(URI_PREFIX)?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    let p = dir(svc, account).join(format!("{id}.zip"));
    std::fs::symlink_metadata(&p).ok().filter(|m| m.is_file()).map(|_| p)
}

/// Serves `POST /hearth/v1/artifacts`.
pub async fn receive(svc: Arc<Service>, parts: http::request::Parts, body: Body) -> Response {
    match receive_inner(&svc, &parts, body).await {
        Ok(r) => r,
        Err(e) => {
            svc.metrics.request("UploadArtifact", e.status());
            e.into_response()
        }
    }
}

async fn receive_inner(svc: &Service, parts: &http::request::Parts, body: Body) -> Result<Response, ApiError> {
    let (account, claimed_hash) = svc.streamed_caller(parts).await?;
    // The account's quota on one artifact bounds the upload; the host keeps its disk reserve.
    let max = svc.artifact_limit(&account).await?;
    let too_large = |n: u64| svc.artifact_refusal(&account, n);
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max) {
        return Err(too_large(n).await);
    }
    svc.capacity.check_disk(&svc.state, declared.unwrap_or(0))?;
    let dir = dir(svc, &account);
    tokio::fs::create_dir_all(&dir).await.map_err(ApiError::internal)?;
    prune(&dir, UPLOAD_TTL);
    // A temporary file of our own, removed on every early return.
    let tmp = tempfile::Builder::new().prefix(".upload-").tempfile_in(&dir).map_err(ApiError::internal)?;
    let (file, tmp_path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut head: Vec<u8> = Vec::with_capacity(4);
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(ApiError::validation(format!("the upload stalled: nothing arrived for {} s", IDLE_TIMEOUT.as_secs()))),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ApiError::validation("the upload broke off before its end")),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        size += data.len() as u64;
        if size > max {
            return Err(too_large(size).await);
        }
        if head.len() < 4 {
            head.extend(data.iter().take(4 - head.len()));
        }
        hash.update(&data);
        file.write_all(&data).await.map_err(ApiError::internal)?;
    }
    let sha = format!("{:x}", hash.finalize());
    if sha != claimed_hash {
        return Err(ApiError::new(Kind::InvalidSignature, "the upload's body does not match its X-Amz-Content-Sha256"));
    }
    // A zip starts with a local file header, or is empty (end of central directory).
    if head[..] != b"PK\x03\x04"[..] && head[..] != b"PK\x05\x06"[..] {
        return Err(ApiError::validation("the upload is not a zip archive: upload a zip with a Dockerfile at its root"));
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    drop(file);
    let dest = dir.join(format!("{sha}.zip"));
    tmp_path.persist(&dest).map_err(|e| ApiError::internal(e.error))?;
    svc.metrics.request("UploadArtifact", 201);
    tracing::info!(%account, bytes = size, sha256 = %sha, "code artifact uploaded");
    let out = serde_json::json!({ "uri": format!("{URI_PREFIX}{sha}"), "sha256": sha, "size": size });
    Ok((http::StatusCode::CREATED, [("content-type", "application/json")], out.to_string()).into_response())
}

/// Removes uploads in `dir` older than `ttl` (and temporary files a crash left).
fn prune(dir: &Path, ttl: Duration) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).is_some_and(|age| age > ttl);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
