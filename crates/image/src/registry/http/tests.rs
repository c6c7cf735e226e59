use super::*;
use crate::artifact::Guard;
use std::net::SocketAddr;
use std::sync::Arc;

/// A one-route-table HTTP server on loopback answering each request with `respond(path)`,
/// then closing. Returns `host:port`.
async fn serve(respond: fn(&str) -> Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
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
                let _ = conn.write_all(&respond(&path)).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    host
}

fn response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

const SECRET: &str = "internal-service-reply";

/// A hostile registry: redirects, a token service on a private address, huge replies.
fn hostile(path: &str) -> Vec<u8> {
    let redirect = |to: &str| response("302 Found", &format!("Location: {to}\r\n"), b"");
    match path {
        "/v2/r/manifests/metadata" => redirect("http://169.254.169.254/latest/meta-data/"),
        "/v2/r/manifests/daemon" => redirect("http://127.0.0.1:1/v2/"),
        "/v2/r/manifests/localhost" => redirect("http://localhost:1/v2/"),
        "/v2/r/manifests/token" => {
            response("401 Unauthorized", "WWW-Authenticate: Bearer realm=\"http://10.1.2.3/token\",service=\"x\"\r\n", b"")
        }
        "/v2/r/manifests/huge" => {
            let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            r.extend(std::iter::repeat_n(b' ', MAX_MANIFEST_BYTES + 1));
            r
        }
        "/v2/r/manifests/chatty" => {
            response("500 Internal Server Error", "", format!(r#"{{"errors":[{{"code":"X","message":"{SECRET}"}}]}}"#).as_bytes())
        }
        "/v2/r/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000" => response("200 OK", "", b"not the digest"),
        _ => response("404 Not Found", "", b""),
    }
}

/// A tenant's registry client that lets the test server at `host` (and only it) through.
fn tenant(host: &str) -> Registry {
    let server: SocketAddr = host.parse().unwrap();
    let mut guard = Guard::tenant().unwrap();
    guard.exempt = vec![server];
    let guard = Arc::new(guard);
    let client = crate::artifact::guarded(reqwest::Client::builder(), &guard, None).build().unwrap();
    Registry::new(client, "http", host, "r", None, Some(guard))
}

fn ctx(trusted: bool) -> Ctx {
    Ctx { reference: "x/r:1".into(), registry: "x".into(), via: String::new(), trusted }
}

#[tokio::test]
async fn a_tenants_registry_cannot_send_the_pull_to_private_addresses() {
    let host = serve(hostile).await;
    for tag in ["metadata", "daemon", "localhost", "token"] {
        let e = tenant(&host).manifest(&ctx(false), tag).await.unwrap_err();
        assert!(matches!(e, PullError::Refused { .. }), "{tag}: {e}");
        let text = e.to_string();
        assert!(text.contains("non-public address"), "{tag}: {text}");
    }
}

#[tokio::test]
async fn replies_are_read_with_a_cap_and_quoted_only_from_the_operators_registries() {
    let host = serve(hostile).await;
    let e = tenant(&host).manifest(&ctx(false), "huge").await.unwrap_err();
    assert!(e.to_string().contains(&format!("over {MAX_MANIFEST_BYTES} bytes")), "{e}");
    let e = tenant(&host).manifest(&ctx(false), "chatty").await.unwrap_err().to_string();
    assert!(e.contains("HTTP 500") && !e.contains(SECRET), "{e}");
    let e = tenant(&host).manifest(&ctx(true), "chatty").await.unwrap_err().to_string();
    assert!(e.contains(SECRET), "{e}");
}

#[tokio::test]
async fn blobs_must_match_their_size_and_digest() {
    let host = serve(hostile).await;
    let zero = format!("sha256:{}", "0".repeat(64));
    let mut out = Vec::new();
    let e = tenant(&host).blob(&ctx(false), &zero, 4, &mut out).await.unwrap_err();
    assert!(e.to_string().contains("more bytes than the manifest declares"), "{e}");
    let mut out = Vec::new();
    let e = tenant(&host).blob(&ctx(false), &zero, 14, &mut out).await.unwrap_err();
    assert!(e.to_string().contains("does not match its digest"), "{e}");
}
