//! File and directory writes into a microvm, streamed: `PUT
//! /hearth/v1/microvms/<id>/files?path=` (a file) and `PUT …/files/archive?path=` (a tar
//! archive unpacked into a new directory, [`hearth_proto::archive`]). The body goes to the
//! guest's agent as it arrives, never whole in the daemon, at any size up to the guest's
//! free disk (the agent checks the declared `Content-Length` against it first: a body that
//! cannot fit is refused before it is read).
//!
//! Like a code artifact upload ([`crate::upload`]), the request is authenticated before a
//! byte is read, with SigV4 over the body's SHA-256 as `X-Amz-Content-Sha256` claims it.
//! What arrives is hashed on its way to the agent; the agent writes a temporary file (or
//! directory) beside the target and renames it into place only when the body ends cleanly,
//! so the daemon ends the body in an error when it turns out broken off, stalled or not
//! what was signed: the guest's path is then untouched. `UNSIGNED-PAYLOAD` is refused:
//! the API may be served over plain HTTP, where an unsigned body could be replaced on its
//! way, and the client can always hash what it sends (`hearth cp -r` hashes its archive
//! in a first pass). A request without the header (any SigV4 client that signs its body)
//! takes the API's buffered path, bounded by [`crate::model::MAX_BODY`].
//!
//! Reads are streamed by [`Service::read_file`] and [`Service::read_archive`]; both
//! directions keep at most a few MiB of a transfer in the daemon
//! ([`crate::service::TRANSFER_CHUNKS`] and the agent's flow-control window).

use crate::error::{ApiError, Kind};
use crate::service::Service;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// How long the client may leave the body silent before the write is abandoned.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most of a refused body read (and dropped) before the refusal is sent, and how long
/// each part of it may take: a client that is still sending reads the answer then,
/// instead of a connection reset under its feet ("Broken pipe").
const LINGER_BYTES: u64 = 64 << 20;
const LINGER_IDLE: Duration = Duration::from_secs(2);

/// What a streamed write writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A file (`…/files`).
    File,
    /// A directory from a tar archive (`…/files/archive`).
    Archive,
}

/// What a request this module serves writes: a file or archive write that claims its
/// body's hash; `None` for any other request.
pub fn streamed_write(method: &http::Method, path: &str, headers: &http::HeaderMap) -> Option<Target> {
    if method != http::Method::PUT || !headers.contains_key("x-amz-content-sha256") {
        return None;
    }
    let (id, rest) = path.strip_prefix("/hearth/v1/microvms/")?.split_once('/')?;
    match rest {
        _ if id.is_empty() => None,
        "files" => Some(Target::File),
        "files/archive" => Some(Target::Archive),
        _ => None,
    }
}

/// Serves a streamed file or archive write.
pub async fn receive(svc: Arc<Service>, parts: http::request::Parts, body: Body, target: Target) -> Response {
    let op = match target {
        Target::File => "WriteFile",
        Target::Archive => "WriteArchive",
    };
    match receive_inner(&svc, &parts, body, target).await {
        Ok(answer) => {
            svc.metrics.request(op, 200);
            (http::StatusCode::OK, [("content-type", "application/json")], answer.to_string()).into_response()
        }
        Err(e) => {
            svc.metrics.request(op, e.status());
            e.into_response()
        }
    }
}

async fn receive_inner(svc: &Service, parts: &http::request::Parts, body: Body, target: Target) -> Result<serde_json::Value, ApiError> {
    let (account, claimed_hash) = svc.streamed_caller(parts).await?;
    let id = parts.uri.path().trim_start_matches("/hearth/v1/microvms/").trim_end_matches("/files/archive").trim_end_matches("/files");
    let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy().into_owned();
    let path = crate::server::query_pairs(parts.uri.query())
        .into_iter()
        .find(|(k, _)| k == "path")
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::validation("missing ?path="))?;
    // Checked by the agent against the guest's free space before the body is read.
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
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
            let next = tokio::select! {
                n = tokio::time::timeout(IDLE_TIMEOUT, body.frame()) => Some(n),
                // The agent refused (a full disk, a bad path) and took no more.
                () = tx.closed() => None,
            };
            let frame = match next {
                None => {
                    linger(&mut body).await;
                    return Ok(None);
                }
                Some(Err(_)) => {
                    let why = format!("the upload stalled: nothing arrived for {} s", IDLE_TIMEOUT.as_secs());
                    return abort(tx, ApiError::validation(why)).await;
                }
                Some(Ok(None)) => break,
                Some(Ok(Some(Err(_)))) => return abort(tx, ApiError::validation("the upload broke off before its end")).await,
                Some(Ok(Some(Ok(f)))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            hash.update(&data);
            if tx.send(Ok(data)).await.is_err() {
                linger(&mut body).await;
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
    // The body's own fault first: the agent's failure is then only its consequence.
    match target {
        Target::File => {
            let (pumped, written) = tokio::join!(pump, svc.write_file(&account, &id, path, declared, chunks));
            let size = pumped?;
            let info = written??;
            tracing::info!(%account, microvm = %id, bytes = info.size, "file written");
            Ok(serde_json::json!({ "size": size.unwrap_or(info.size) }))
        }
        Target::Archive => {
            let (pumped, written) = tokio::join!(pump, svc.write_archive(&account, &id, path, declared, chunks));
            let size = pumped?;
            let stats = written??;
            tracing::info!(%account, microvm = %id, entries = stats.entries, bytes = stats.bytes, "archive unpacked");
            Ok(serde_json::json!({ "size": size.unwrap_or(0), "entries": stats.entries, "bytes": stats.bytes }))
        }
    }
}

/// Reads on a little (and drops) what a client still sends after the agent refused its
/// body, so that it gets the refusal (its answer says why) rather than a reset.
async fn linger(body: &mut Body) {
    let mut left = LINGER_BYTES;
    while let Ok(Some(Ok(f))) = tokio::time::timeout(LINGER_IDLE, body.frame()).await {
        left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len() as u64));
        if left == 0 {
            break;
        }
    }
}
