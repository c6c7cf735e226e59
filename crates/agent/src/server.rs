//! The agent's HTTP/2 service: routing, limits, and JSON helpers.

use crate::reaper::Reaper;
use crate::{exec, files};
use bytes::Bytes;
use hearth_proto::{ErrorBody, ErrorCode, Hello, MAX_JSON_BODY, PROTOCOL_HEADER, PROTOCOL_VERSION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// Response body type of every handler.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// State shared by all connections.
pub struct State {
    /// Registry of spawned children.
    pub reaper: Arc<Reaper>,
    /// True when the agent is the guest's PID 1 (and may power the machine off).
    pub is_init: bool,
}

impl State {
    /// New state.
    pub fn new(reaper: Arc<Reaper>, is_init: bool) -> Self {
        State { reaper, is_init }
    }
}

/// Serves one HTTP/2 connection until the peer goes away or asks to detach.
///
/// `POST /v1/detach` makes the agent shut the connection down gracefully (GOAWAY, then
/// stop reading) so the host knows that everything it sends after closing its socket
/// belongs to its next connection.
pub async fn serve_connection<IO>(io: IO, state: Arc<State>) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let detach = Arc::new(tokio::sync::Notify::new());
    let d = detach.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let detach = d.clone();
        async move {
            if req.method() == Method::POST && req.uri().path() == "/v1/detach" {
                detach.notify_one();
                return Ok::<_, Infallible>(json(StatusCode::OK, &serde_json::json!({})));
            }
            Ok::<_, Infallible>(route(state, req).await)
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 << 10)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = detach.notified() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/hello") => hello(&req),
        (Method::POST, "/v1/exec") => exec::handle(state, req).await,
        (Method::GET, "/v1/files") => files::read(req).await,
        (Method::PUT, "/v1/files") => files::write(req).await,
        (Method::GET, "/v1/archive") => crate::archive::read(req).await,
        (Method::PUT, "/v1/archive") => crate::archive::write(req).await,
        (Method::POST, p) if p.starts_with("/v1/fs/") => files::fs_op(req).await,
        (Method::POST, "/v1/shutdown") => shutdown(&state),
        (Method::POST, "/v1/restore") => crate::restore::restore(req).await,
        (Method::POST, "/v1/sync") => crate::restore::sync().await,
        (Method::GET | Method::POST, "/v1/hook") => crate::hook::call(req).await,
        (Method::POST, "/v1/connect") => crate::tunnel::connect(req).await,
        (Method::POST, "/v1/metadata/accept") => crate::metadata::accept(req).await,
        _ => error(StatusCode::NOT_FOUND, ErrorCode::InvalidInput, format!("no route for {path}")),
    }
}

fn hello(req: &Request<Incoming>) -> Response<Body> {
    let host_version = req.headers().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    if host_version != Some(PROTOCOL_VERSION) {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::VersionMismatch,
            format!("agent speaks protocol {PROTOCOL_VERSION}, host sent {host_version:?}"),
        );
    }
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let uptime_ms = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0);
    json(StatusCode::OK, &Hello { protocol: PROTOCOL_VERSION, agent_version: env!("CARGO_PKG_VERSION").into(), kernel, uptime_ms })
}

fn shutdown(state: &State) -> Response<Body> {
    let is_init = state.is_init;
    tokio::spawn(async move {
        // Let the response reach the host first.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if is_init {
            tokio::task::spawn_blocking(|| crate::init::power_off());
        } else {
            std::process::exit(0);
        }
    });
    json(StatusCode::OK, &serde_json::json!({}))
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("static response parts")
}

/// An error response.
pub fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    json(status, &ErrorBody { code, message: message.into() })
}

/// What to do about a full filesystem, said with every ENOSPC.
pub const DISK_FULL: &str =
    "the filesystem is full; remove files, or for the root disk give the image a bigger one (its tag hearth:disk-size-gib)";

/// The response for an I/O error on `what`.
pub fn io_error(what: &str, e: &std::io::Error) -> Response<Body> {
    use std::io::ErrorKind as K;
    let (status, code) = match e.kind() {
        K::NotFound => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
        K::AlreadyExists => (StatusCode::CONFLICT, ErrorCode::AlreadyExists),
        K::PermissionDenied => (StatusCode::FORBIDDEN, ErrorCode::PermissionDenied),
        K::InvalidInput | K::InvalidData => (StatusCode::BAD_REQUEST, ErrorCode::InvalidInput),
        K::IsADirectory | K::NotADirectory | K::DirectoryNotEmpty => (StatusCode::CONFLICT, ErrorCode::WrongKind),
        // The tenant's disk is full: theirs to act on, so the message says how.
        K::StorageFull | K::QuotaExceeded => {
            return error(StatusCode::INSUFFICIENT_STORAGE, ErrorCode::StorageFull, format!("{what}: {e}: {DISK_FULL}"));
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Io),
    };
    error(status, code, format!("{what}: {e}"))
}

/// A whole body.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

/// Reads a JSON request body of at most [`MAX_JSON_BODY`] bytes.
pub async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let bytes = Limited::new(req.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, format!("reading body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, format!("invalid JSON: {e}")))
}

/// A streaming body fed from a channel of chunks.
pub fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item.map(hyper::body::Frame::data), rx)) });
    http_body_util::StreamBody::new(stream).boxed()
}
