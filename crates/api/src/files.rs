//! File writes into a microvm (`PUT /hearth/v1/microvms/<id>/files?path=`), streamed:
//! the body goes to the guest's agent as it arrives, never whole in the daemon.
//!
//! Like a code artifact upload ([`crate::upload`]), the request is authenticated before a
//! byte is read, with SigV4 over the body's SHA-256 as `X-Amz-Content-Sha256` claims it.
//! What arrives is hashed on its way to the agent; the agent writes a temporary file and
//! renames it into place only when the body ends cleanly, so the daemon ends the body in an
//! error when it turns out over [`MAX_FILE_BYTES`], broken off, or not what was signed: the
//! guest's file is then untouched. A request without the header (any SigV4 client that
//! signs its body) takes the API's buffered path, bounded by [`crate::model::MAX_BODY`].
//!
//! Reads are streamed by [`Service::read_file`]; both directions keep at most a few MiB of
//! a transfer in the daemon ([`crate::service`]'s `TRANSFER_CHUNKS` and the agent's
//! flow-control window).

use crate::error::{ApiError, Kind};
use crate::service::{Service, MAX_FILE_BYTES};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// How long the client may leave the body silent before the write is abandoned.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// True for a request this module serves: a file write that claims its body's hash.
pub fn is_streamed_write(method: &http::Method, path: &str, headers: &http::HeaderMap) -> bool {
    method == http::Method::PUT
        && headers.contains_key("x-amz-content-sha256")
        && path
            .strip_prefix("/hearth/v1/microvms/")
            .and_then(|r| r.split_once('/'))
            .is_some_and(|(id, rest)| !id.is_empty() && rest == "files")
}

/// Serves a streamed file write.
pub async fn receive(svc: Arc<Service>, parts: http::request::Parts, body: Body) -> Response {
    match receive_inner(&svc, &parts, body).await {
        Ok(size) => {
            svc.metrics.request("WriteFile", 200);
            (http::StatusCode::OK, [("content-type", "application/json")], serde_json::json!({ "size": size }).to_string()).into_response()
        }
        Err(e) => {
            svc.metrics.request("WriteFile", e.status());
            e.into_response()
        }
    }
}

async fn receive_inner(svc: &Service, parts: &http::request::Parts, body: Body) -> Result<u64, ApiError> {
    let (account, claimed_hash) = svc.streamed_caller(parts).await?;
    let id = parts.uri.path().trim_start_matches("/hearth/v1/microvms/").trim_end_matches("/files");
    let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy().into_owned();
    let path = crate::server::query_pairs(parts.uri.query())
        .into_iter()
        .find(|(k, _)| k == "path")
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::validation("missing ?path="))?;
    let too_large = || ApiError::validation(format!("the file is over the {MAX_FILE_BYTES}-byte limit on file transfers"));
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_FILE_BYTES) {
        return Err(too_large());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(crate::service::TRANSFER_CHUNKS);
    // Feeds the agent; `Ok(None)` when the agent stopped taking the body (its answer says why).
    let pump = async move {
        let abort = |tx: tokio::sync::mpsc::Sender<_>, e: ApiError| async move {
            // An error ends the agent's stream without its end: the file is not renamed into place.
            let _ = tx.send(Err(std::io::Error::other(e.message.clone()))).await;
            Err(e)
        };
        let mut body = body;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
                Err(_) => {
                    let why = format!("the upload stalled: nothing arrived for {} s", IDLE_TIMEOUT.as_secs());
                    return abort(tx, ApiError::validation(why)).await;
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => return abort(tx, ApiError::validation("the upload broke off before its end")).await,
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            if size > MAX_FILE_BYTES {
                return abort(tx, too_large()).await;
            }
            hash.update(&data);
            if tx.send(Ok(data)).await.is_err() {
                return Ok(None);
            }
        }
        if format!("{:x}", hash.finalize()) != claimed_hash {
            return abort(tx, ApiError::new(Kind::InvalidSignature, "the body does not match its X-Amz-Content-Sha256")).await;
        }
        // Dropping the sender ends the stream: the agent renames the file into place.
        drop(tx);
        Ok(Some(size))
    };
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let write = svc.write_file(&account, &id, path, chunks);
    let (pumped, written) = tokio::join!(pump, write);
    // The body's own fault first: the agent's failure is then only its consequence.
    let size = pumped?;
    let info = written??;
    tracing::info!(%account, microvm = %id, bytes = info.size, "file written");
    Ok(size.unwrap_or(info.size))
}
