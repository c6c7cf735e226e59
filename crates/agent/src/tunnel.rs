//! `POST /v1/connect?port=P`: a TCP connection to `127.0.0.1:P` inside the guest, carried
//! by one HTTP/2 stream: the request body is what the host sends, the response body what
//! the app answers. Ingress to microvms goes through it, so apps need no route from the
//! host and no network device.

use crate::server::{self, Body};
use bytes::Bytes;
use hearth_proto::ErrorCode;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Handles one tunnel.
pub async fn connect(req: Request<Incoming>) -> Response<Body> {
    let q = req.uri().query().unwrap_or("");
    let Some(port) = q.split('&').find_map(|kv| kv.strip_prefix("port=")).and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0) else {
        return server::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, "connect needs port=1-65535");
    };
    let stream = match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(("127.0.0.1", port))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return server::error(StatusCode::BAD_GATEWAY, ErrorCode::Io, format!("connect to 127.0.0.1:{port} in the guest: {e}"))
        }
        Err(_) => {
            return server::error(StatusCode::GATEWAY_TIMEOUT, ErrorCode::Io, format!("connect to 127.0.0.1:{port} in the guest timed out"))
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut body = req.into_body();
    // Host → app: until the host ends its side; then the app sees end of input.
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if wr.write_all(&data).await.is_err() {
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    // App → host: until the app closes; the response ends there.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                // The host went away while the app was silent.
                _ = tx.closed() => break,
            };
            if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                break;
            }
        }
    });
    Response::builder().status(StatusCode::OK).body(server::channel_body(rx)).expect("static response")
}
