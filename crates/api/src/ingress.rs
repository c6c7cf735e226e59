//! Ingress: each microvm's endpoint — its own host `<id>.<domain>` ([`crate::endpoint`]),
//! or the fallback `<daemon URL>/microvms/<id>/…` — proxies HTTP (streaming bodies, SSE,
//! WebSocket upgrades) to a port of the app inside the VM — 8080 unless the request
//! names another in `X-aws-proxy-port` (or a `lambda-microvms.port.N` subprotocol).
//! The fallback strips `Cookie` and `Set-Cookie` both ways: all microvms share the
//! daemon's origin there. Every request needs a
//! token from CreateMicrovmAuthToken in `X-aws-proxy-auth`; anything else is refused
//! before it reaches the VM. A request for a SUSPENDED microvm whose idle policy allows
//! it resumes it first (concurrent requests share the resume: they wait on the
//! microvm's lock, and the first one resumes).
//!
//! The proxy reaches the app through the agent channel (`POST /v1/connect`, one HTTP/2
//! stream per connection) rather than the VM's network: it needs no NIC, no route from the
//! host into the guest and no address allocation, works the same on clones and resumed
//! VMs, and cannot be pointed at anything but the guest's own loopback.
//!
//! Tokens: `base64url(claims).hex(HMAC-SHA256(key, claims))` with the account, microvm,
//! expiry and allowed ports; the key is 32 random bytes in the state directory (0600).

use crate::error::{ApiError, Kind};
use crate::service::Service;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The header carrying the token.
pub const AUTH_HEADER: &str = "x-aws-proxy-auth";
/// The header choosing the app's port.
pub const PORT_HEADER: &str = "x-aws-proxy-port";
/// Port used when the request names none.
pub const DEFAULT_PORT: u16 = 8080;
/// Longest a token may live.
pub const MAX_TOKEN_MINUTES: u64 = 24 * 60;
/// How long the app may take to send response headers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long resuming (if needed) and connecting to the app may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a token grants.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Account.
    pub a: String,
    /// Microvm id.
    pub m: String,
    /// Expiry, seconds since the epoch.
    pub e: u64,
    /// Allowed port ranges (inclusive); empty means every port.
    pub p: Vec<(u16, u16)>,
    /// What the token opens: absent for the endpoint, [`SHELL_SCOPE`] for the shell. A
    /// token opens nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<String>,
}

/// The scope of shell tokens.
pub const SHELL_SCOPE: &str = "shell";

/// The token key.
pub struct TokenKey(Vec<u8>);

impl TokenKey {
    /// Loads the key from `dir/token.key`, creating it on first use; held to the same
    /// checks as the sealing key (0600, this user's, 32 bytes): whoever reads it can
    /// forge endpoint and shell tokens for every microvm.
    ///
    /// # Errors
    ///
    /// As [`crate::keys::load_key_file`]: a damaged or exposed file stops the daemon
    /// rather than being replaced in silence.
    pub fn load_or_create(dir: &Path) -> Result<TokenKey, crate::keys::SealingKeyError> {
        let path = dir.join("token.key");
        let bytes = match crate::keys::load_key_file(&path)? {
            Some(b) => b,
            None => crate::keys::create_key_file(&path)?,
        };
        Ok(TokenKey(bytes.to_vec()))
    }

    fn mac(&self, data: &[u8]) -> String {
        aws_sigv4::sign::v4::calculate_signature(&self.0, data)
    }

    /// A token for `claims`.
    pub fn issue(&self, claims: &Claims) -> String {
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let mac = self.mac(body.as_bytes());
        format!("{body}.{mac}")
    }

    /// The claims of a genuine, unexpired token.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, &'static str> {
        if token.len() > 4096 {
            return Err("malformed token");
        }
        let (body, mac) = token.split_once('.').ok_or("malformed token")?;
        let expected = self.mac(body.as_bytes());
        let same = expected.len() == mac.len() && expected.bytes().zip(mac.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if !same {
            return Err("invalid token");
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body).map_err(|_| "malformed token")?;
        let claims: Claims = serde_json::from_slice(&raw).map_err(|_| "malformed token")?;
        if claims.e <= now {
            return Err("expired token");
        }
        Ok(claims)
    }
}

/// The claims' port ranges from the API's `allowedPorts` (already validated by the model).
pub fn port_ranges(allowed: &serde_json::Value) -> Result<Vec<(u16, u16)>, ApiError> {
    let mut out = Vec::new();
    for spec in allowed.as_array().into_iter().flatten() {
        if let Some(p) = spec.get("port").and_then(serde_json::Value::as_u64) {
            out.push((p as u16, p as u16));
        } else if let Some(r) = spec.get("range") {
            let (s, e) = (r["startPort"].as_u64().unwrap_or(0) as u16, r["endPort"].as_u64().unwrap_or(0) as u16);
            if s > e {
                return Err(ApiError::validation(format!("allowedPorts: range {s}-{e} is empty")));
            }
            out.push((s, e));
        } else if spec.get("allPorts").is_some() {
            return Ok(Vec::new());
        }
    }
    Ok(out)
}

fn denied(msg: &str) -> Response {
    ApiError::new(Kind::AccessDenied, msg).into_response()
}

/// The claims of the request's token, if it is genuine, unexpired, for microvm `id` and
/// of `scope` (None: the endpoint; [`SHELL_SCOPE`]: the shell); else the refusal.
pub fn authorize(svc: &Service, headers: &http::HeaderMap, id: &str, scope: Option<&str>) -> Result<Claims, Response> {
    let operation = if scope.is_some() { "CreateMicrovmShellAuthToken" } else { "CreateMicrovmAuthToken" };
    let Some(token) = headers.get(AUTH_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err(denied(&format!("missing X-aws-proxy-auth token ({operation})")));
    };
    let claims = svc.token_key.verify(token, crate::clock::now() as u64).map_err(denied)?;
    if claims.m != id {
        return Err(denied("the token is for another microvm"));
    }
    if claims.k.as_deref() != scope {
        return Err(denied(&format!("this token does not open this; use {operation}")));
    }
    Ok(claims)
}

/// The answer when a microvm already has [`crate::service::MAX_INGRESS_CONNECTIONS`]
/// connections: 429 with `Retry-After`, as HTTP clients and load balancers expect.
pub fn too_busy() -> Response {
    let body = serde_json::json!({ "message": format!("too many concurrent connections to this microvm (at most {})", crate::service::MAX_INGRESS_CONNECTIONS) });
    (
        http::StatusCode::TOO_MANY_REQUESTS,
        [(http::header::RETRY_AFTER, "1"), (http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Which of a microvm's two addresses a request came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Its own host, `<id>.<domain>` ([`crate::endpoint`]): an origin of its own.
    Host,
    /// The fallback under the daemon's URL, `/microvms/<id>/…`: it shares the daemon's
    /// origin with every other microvm's path, so it carries no cookies either way.
    Path,
}

/// Proxies one request for microvm `id` to the app's path `/<rest>`.
pub async fn proxy(svc: Arc<Service>, mut req: axum::extract::Request, id: String, rest: String, form: Form) -> Response {
    // Browsers give the token and the port as subprotocols (`lambda-microvms.…`).
    let lambda_offered = crate::endpoint::take_subprotocols(req.headers_mut());
    let via_tls = req.extensions().get::<crate::endpoint::ViaTls>().is_some();
    // A browser opened a link (`crate::links`): its cookie, on the microvm's own host only.
    let from_cookie = match form {
        Form::Host => crate::links::cookie_claims(&svc, req.headers_mut(), &id),
        Form::Path => None,
    };
    let claims = match from_cookie.unwrap_or_else(|| authorize(&svc, req.headers(), &id, None)) {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let port = match req.headers().get(PORT_HEADER).map(|v| v.to_str().ok().and_then(|s| s.parse::<u16>().ok()).filter(|p| *p > 0)) {
        None => DEFAULT_PORT,
        Some(Some(p)) => p,
        Some(None) => return ApiError::validation("X-aws-proxy-port must be a port number").into_response(),
    };
    if !claims.p.is_empty() && !claims.p.iter().any(|(s, e)| (*s..=*e).contains(&port)) {
        return denied("the token does not allow this port");
    }
    // At most this many connections to one microvm at once; the permit and a VM handle
    // live as long as the connection (its body or its upgraded stream), so open
    // connections count as activity and keep the bound.
    let Ok(permit) = svc.ingress_permit(&id) else {
        return too_busy();
    };
    let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let vm = svc.vm_handle(&claims.a, &id).await.map_err(IntoResponse::into_response)?;
        let t = vm.agent().connect_port(port).await.map_err(|e| {
            (http::StatusCode::BAD_GATEWAY, format!("the app does not accept connections on port {port}: {e}\n")).into_response()
        })?;
        Ok::<_, Response>((vm, t))
    })
    .await;
    let (vm, tunnel) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(r)) => return r,
        Err(_) => {
            return (http::StatusCode::GATEWAY_TIMEOUT, format!("no connection to the app within {CONNECT_TIMEOUT:?}\n")).into_response()
        }
    };
    let held = (permit, vm);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tunnel)).await {
        Ok(x) => x,
        Err(e) => return ApiError::internal(format!("proxy handshake: {e}")).into_response(),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // HTTP/2 requests carry the host in the URI's authority; HTTP/1.1 needs the header.
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(v) = parts.uri.authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    parts.headers.remove(AUTH_HEADER);
    parts.headers.remove(PORT_HEADER);
    if form == Form::Path {
        // One origin for every microvm's path: a cookie set by one app would be sent to all.
        parts.headers.remove(http::header::COOKIE);
    }
    if via_tls {
        parts.headers.insert("x-forwarded-proto", http::HeaderValue::from_static("https"));
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let q = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    parts.uri = match format!("/{rest}{q}").parse() {
        Ok(u) => u,
        Err(_) => return ApiError::validation("bad request path").into_response(),
    };
    parts.version = http::Version::HTTP_11;
    let out = http::Request::from_parts(parts, body);
    let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (http::StatusCode::BAD_GATEWAY, format!("the app's answer broke off: {e}\n")).into_response(),
        Err(_) => {
            return (http::StatusCode::GATEWAY_TIMEOUT, format!("the app did not answer within {RESPONSE_TIMEOUT:?}\n")).into_response()
        }
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return (http::StatusCode::BAD_GATEWAY, "the app switched protocols unasked\n").into_response();
        };
        let (mut parts, body) = resp.into_parts();
        let mut app_resp = http::Response::from_parts(parts.clone(), body);
        // A browser that offered `lambda-microvms` fails a handshake that answers none of
        // its subprotocols; the app, which never saw it, may have picked none.
        if lambda_offered && !parts.headers.contains_key(http::header::SEC_WEBSOCKET_PROTOCOL) {
            parts.headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(crate::endpoint::SUBPROTOCOL));
        }
        if form == Form::Path {
            parts.headers.remove(http::header::SET_COOKIE);
        }
        let app = hyper::upgrade::on(&mut app_resp);
        tokio::spawn(async move {
            let _held = held;
            if let (Ok(c), Ok(a)) = (client.await, app.await) {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut a = hyper_util::rt::TokioIo::new(a);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut a).await;
            }
        });
        return http::Response::from_parts(parts, axum::body::Body::empty());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    if form == Form::Path {
        parts.headers.remove(http::header::SET_COOKIE);
    }
    // The body carries the permit and the VM handle until it ends.
    let stream = futures_util::StreamExt::map(http_body_util::BodyExt::into_data_stream(body), move |chunk| {
        let _ = &held;
        chunk
    });
    http::Response::from_parts(parts, axum::body::Body::from_stream(stream))
}

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1), keeping `Connection`/`Upgrade`
/// for an upgrade.
fn strip_hop_by_hop(h: &mut http::HeaderMap, upgrade: bool) {
    let named: Vec<String> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter(|n| !(upgrade && n == "upgrade"))
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"] {
        h.remove(n);
    }
    if !upgrade {
        h.remove(http::header::CONNECTION);
        h.remove(http::header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_refuse_forgeries() {
        let dir = tempfile::tempdir().unwrap();
        let k = TokenKey::load_or_create(dir.path()).unwrap();
        assert_eq!(TokenKey::load_or_create(dir.path()).unwrap().0, k.0, "the key persists");
        // Whoever reads the key forges tokens: an exposed or damaged file is refused, never
        // replaced in silence.
        let path = dir.path().join("token.key");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(matches!(TokenKey::load_or_create(dir.path()), Err(crate::keys::SealingKeyError::Exposed { .. })));
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert!(matches!(TokenKey::load_or_create(dir.path()), Err(crate::keys::SealingKeyError::Malformed { .. })));
        std::fs::remove_file(&path).unwrap();
        let k = TokenKey::load_or_create(dir.path()).unwrap();
        let c = Claims { a: "111111111111".into(), m: "mvm-1".into(), e: 1000, p: vec![(8080, 8080)], k: None };
        let t = k.issue(&c);
        assert_eq!(k.verify(&t, 999).unwrap(), c);
        assert_eq!(k.verify(&t, 1000).unwrap_err(), "expired token");
        let forged = Claims { m: "mvm-2".into(), ..c.clone() };
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let mac = t.split_once('.').unwrap().1;
        assert_eq!(k.verify(&format!("{body}.{mac}"), 1).unwrap_err(), "invalid token");
        assert!(k.verify("garbage", 1).is_err());
        let other = TokenKey(vec![7; 32]);
        assert_eq!(other.verify(&t, 1).unwrap_err(), "invalid token");
    }

    #[test]
    fn port_specs() {
        let v = serde_json::json!([{ "port": 8080 }, { "range": { "startPort": 9000, "endPort": 9010 } }]);
        assert_eq!(port_ranges(&v).unwrap(), vec![(8080, 8080), (9000, 9010)]);
        assert_eq!(port_ranges(&serde_json::json!([{ "allPorts": {} }])).unwrap(), vec![]);
        assert!(port_ranges(&serde_json::json!([{ "range": { "startPort": 9, "endPort": 1 } }])).is_err());
    }
}
