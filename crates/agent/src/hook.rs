//! `GET|POST /v1/hook`: an HTTP GET, or a POST with the request's body, to the app inside
//! the guest (see `hearth_proto::HookResponse`).

use crate::server::{self, Body};
use hearth_proto::{ErrorCode, HookResponse, MAX_HOOK_BODY, MAX_HOOK_REQUEST};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Handles one hook call.
pub async fn call(req: Request<Incoming>) -> Response<Body> {
    let q = req.uri().query().unwrap_or("");
    let get = |k: &str| q.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')));
    let Some(port) = get("port").and_then(|p| p.parse::<u16>().ok()) else {
        return server::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, "hook needs port=1-65535");
    };
    let path = get("path").unwrap_or("/");
    if !path.starts_with('/') || path.len() > 1024 || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return server::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, "hook path must be /something without spaces");
    }
    let timeout = Duration::from_millis(get("timeout_ms").and_then(|t| t.parse().ok()).unwrap_or(5000).min(600_000));
    let path = path.to_owned();
    let post = req.method() == http::Method::POST;
    let payload = if post {
        match http_body_util::Limited::new(req.into_body(), MAX_HOOK_REQUEST).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return server::error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidInput,
                    format!("hook body: {e} (at most {MAX_HOOK_REQUEST} bytes)"),
                )
            }
        }
    } else {
        bytes::Bytes::new()
    };
    let result = tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        if post {
            s.write_all(
                format!("POST {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n", payload.len()).as_bytes(),
            )
            .await?;
            s.write_all(&payload).await?;
        } else {
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        }
        let mut buf = Vec::new();
        (&mut s).take(MAX_HOOK_BODY as u64 + 8192).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await;
    let raw = match result {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return server::io_error(&format!("hook 127.0.0.1:{port}{path}"), &e),
        Err(_) => return server::error(StatusCode::GATEWAY_TIMEOUT, ErrorCode::Io, format!("hook 127.0.0.1:{port}{path} timed out")),
    };
    let text = String::from_utf8_lossy(&raw);
    let status = text.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse::<u16>().ok());
    let Some(status) = status else {
        return server::error(StatusCode::BAD_GATEWAY, ErrorCode::Io, format!("hook 127.0.0.1:{port}{path} did not answer HTTP"));
    };
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body: String = body.chars().take(MAX_HOOK_BODY).collect();
    server::json(StatusCode::OK, &HookResponse { status, body })
}
