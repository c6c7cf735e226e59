//! Microvm endpoints by host name, as the service gives them: each microvm has a host of
//! its own, `<id>.<domain>`, whose `/` is the app. GetMicrovm's `endpoint` is that host
//! and port, without scheme or trailing slash (the service's form: `<id>.lambda-microvm.
//! <region>.on.aws`; clients write `"https://" + endpoint` and `"wss://" + endpoint +
//! "/shell"`), served over TLS ([`crate::tls`]) and, for a TLS-terminating proxy in
//! front, over plain HTTP on the API's listener: a request is routed by its `Host`
//! (HTTP/1.1) or `:authority` (HTTP/2) before anything else.
//!
//! On such a host:
//! - a WebSocket upgrade carrying a **shell** token (CreateMicrovmShellAuthToken) opens the
//!   microvm's shell ([`crate::shell`]), whatever the path: the service's clients use both
//!   `wss://<endpoint>/shell` and `wss://<endpoint>/`;
//! - anything else goes to the app ([`crate::ingress::proxy`]), endpoint token required.
//!
//! Browsers cannot set headers on a WebSocket, so the token and the port may come as
//! subprotocols, as on the service: `lambda-microvms`, `lambda-microvms.authentication.<T>`,
//! `lambda-microvms.port.<N>` (headers win when both are given). They are taken out of
//! what the app sees, and the handshake answers `lambda-microvms` when the app picks no
//! subprotocol of its own (a browser fails a WebSocket whose offered subprotocols all go
//! unanswered).
//!
//! The API never answers on an endpoint host, and no endpoint on the API's: tenants'
//! JavaScript runs on the endpoint hosts (docs/SECURITY.md, "One origin rule").

use crate::ingress::{Form, AUTH_HEADER, PORT_HEADER};
use crate::service::Service;
use axum::response::Response;
use std::sync::Arc;

/// The subprotocol a service client offers on every WebSocket to an endpoint.
pub const SUBPROTOCOL: &str = "lambda-microvms";
/// Prefix of the subprotocol carrying the token.
pub const AUTH_SUBPROTOCOL_PREFIX: &str = "lambda-microvms.authentication.";
/// Prefix of the subprotocol naming the app's port.
pub const PORT_SUBPROTOCOL_PREFIX: &str = "lambda-microvms.port.";
/// Hearth's older token subprotocol (shells), still accepted.
pub const HEARTH_TOKEN_PREFIX: &str = "hearth-token.";
/// The endpoint domain when the operator names none: browsers and curl resolve every
/// `*.localhost` name to loopback (RFC 6761) with no DNS set-up, and `localhost` and
/// `127.0.0.1` (the API's default host) are different sites.
pub const DEFAULT_DOMAIN: &str = "localhost";

/// Marks a request that came over the endpoint TLS listener (set by its router layer).
#[derive(Debug, Clone, Copy)]
pub struct ViaTls;

/// How `hearth serve` serves endpoints ([`crate::server::ServeConfig::endpoints`]).
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The domain of the endpoint hosts (`<id>.<domain>`).
    pub domain: String,
    /// Where the TLS listener for endpoints listens; none serves them only over the API's
    /// plain listener (behind a TLS-terminating proxy).
    pub tls_listen: Option<std::net::SocketAddr>,
    /// The certificates of the TLS listener.
    pub certs: crate::tls::CertSource,
    /// The port clients reach endpoints at, when not the TLS listener's (a proxy in
    /// front); none: the TLS listener's, or 443 without one.
    pub public_port: Option<u16>,
}

impl Default for EndpointConfig {
    /// Endpoints under `localhost`, with no TLS listener (libraries and benchmarks);
    /// `hearth serve` listens on 127.0.0.1:8443 by default.
    fn default() -> Self {
        EndpointConfig { domain: DEFAULT_DOMAIN.to_owned(), tls_listen: None, certs: crate::tls::CertSource::Generated, public_port: None }
    }
}

/// How microvm endpoints are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The domain under which each microvm has its host (`<id>.<domain>`), lower case.
    pub domain: String,
    /// The port clients reach endpoints at; none (or 443) leaves it out of `endpoint`.
    pub port: Option<u16>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints { domain: DEFAULT_DOMAIN.to_owned(), port: None }
    }
}

impl Endpoints {
    /// GetMicrovm's `endpoint` of microvm `id`: `<id>.<domain>[:port]`.
    pub fn host_of(&self, id: &str) -> String {
        match self.port {
            Some(p) if p != 443 => format!("{id}.{}:{p}", self.domain),
            _ => format!("{id}.{}", self.domain),
        }
    }

    /// The microvm a request for `host` (a `Host` header's value) is for, if it names an
    /// endpoint host.
    pub fn microvm_of<'h>(&self, host: &'h str) -> Option<&'h str> {
        // `[v6]:port` and `v6` are never endpoint hosts; `name:port` loses its port.
        let name = match host.rsplit_once(':') {
            Some((n, p)) if !n.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => host,
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let cut = name.len().checked_sub(self.domain.len() + 1)?;
        let (label, rest) = (name.get(..cut)?, name.get(cut..)?);
        let domain = rest.strip_prefix('.')?;
        (domain.eq_ignore_ascii_case(&self.domain) && valid_label(label)).then_some(label)
    }
}

/// Whether `s` is one DNS label that can be a microvm id: lower-case letters, digits and
/// inner hyphens, at most 63 bytes.
pub fn valid_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The host a request names: `Host`, else the HTTP/2 authority.
pub fn request_host(parts: &http::request::Parts) -> Option<&str> {
    parts.headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

/// The subprotocols a WebSocket handshake offers, in order.
pub fn offered_subprotocols(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The token a request carries: `X-aws-proxy-auth`, else a token subprotocol.
pub fn token_of(headers: &http::HeaderMap) -> Option<String> {
    if let Some(t) = headers.get(AUTH_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(t.to_owned());
    }
    offered_subprotocols(headers)
        .iter()
        .find_map(|p| p.strip_prefix(AUTH_SUBPROTOCOL_PREFIX).or_else(|| p.strip_prefix(HEARTH_TOKEN_PREFIX)).map(str::to_owned))
}

/// Moves a token and a port given as `lambda-microvms` subprotocols into the headers the
/// proxy reads (where those are absent) and takes every `lambda-microvms` subprotocol out
/// of what the app will see. Returns whether the client offered `lambda-microvms`.
pub fn take_subprotocols(headers: &mut http::HeaderMap) -> bool {
    let offered = offered_subprotocols(headers);
    if offered.is_empty() {
        return false;
    }
    let mut lambda = false;
    let mut kept = Vec::new();
    for p in &offered {
        if p == SUBPROTOCOL {
            lambda = true;
        } else if let Some(t) = p.strip_prefix(AUTH_SUBPROTOCOL_PREFIX) {
            if let (false, Ok(v)) = (headers.contains_key(AUTH_HEADER), http::HeaderValue::from_str(t)) {
                headers.insert(AUTH_HEADER, v);
            }
        } else if let Some(n) = p.strip_prefix(PORT_SUBPROTOCOL_PREFIX) {
            if let (false, Ok(v)) = (headers.contains_key(PORT_HEADER), http::HeaderValue::from_str(n)) {
                headers.insert(PORT_HEADER, v);
            }
        } else {
            kept.push(p.as_str());
        }
    }
    headers.remove(http::header::SEC_WEBSOCKET_PROTOCOL);
    if let (false, Ok(v)) = (kept.is_empty(), http::HeaderValue::from_str(&kept.join(", "))) {
        headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    lambda
}

fn is_websocket(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Serves one request for the endpoint host of microvm `id`.
pub async fn serve(svc: Arc<Service>, req: axum::extract::Request, id: String) -> Response {
    if is_websocket(req.headers()) {
        let shell = token_of(req.headers())
            .and_then(|t| svc.token_key.verify(&t, crate::clock::now() as u64).ok())
            .is_some_and(|c| c.m == id && c.k.as_deref() == Some(crate::ingress::SHELL_SCOPE));
        if shell {
            return crate::shell::serve(svc, req, id).await;
        }
    }
    // A link a browser opened: exchanged for the host's cookie (`crate::links`).
    if req.method() == http::Method::GET && crate::links::link_token(req.uri()).is_some() {
        return crate::links::exchange(&svc, &req, &id);
    }
    let rest = req.uri().path().trim_start_matches('/').to_owned();
    crate::ingress::proxy(svc, req, id, rest, Form::Host).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts() {
        let e = Endpoints { domain: "localhost".into(), port: Some(8443) };
        assert_eq!(e.host_of("mvm-1a"), "mvm-1a.localhost:8443");
        assert_eq!(Endpoints { port: Some(443), ..e.clone() }.host_of("mvm-1a"), "mvm-1a.localhost");
        assert_eq!(e.microvm_of("mvm-1a.localhost:8443"), Some("mvm-1a"));
        assert_eq!(e.microvm_of("mvm-1a.LOCALHOST"), Some("mvm-1a"));
        assert_eq!(e.microvm_of("mvm-1a.localhost."), Some("mvm-1a"));
        for not in [
            "localhost",
            "localhost:8377",
            "127.0.0.1:8377",
            "[::1]:8443",
            "a.b.localhost",
            "xlocalhost",
            "MVM.localhost",
            ".localhost",
            "-a.localhost",
            "",
        ] {
            assert_eq!(e.microvm_of(not), None, "{not}");
        }
        let apps = Endpoints { domain: "apps.example.com".into(), port: None };
        assert_eq!(apps.host_of("mvm-2"), "mvm-2.apps.example.com");
        assert_eq!(apps.microvm_of("mvm-2.apps.example.com"), Some("mvm-2"));
        assert_eq!(apps.microvm_of("mvm-2.example.com"), None);
    }

    #[test]
    fn subprotocols_carry_token_and_port() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, "lambda-microvms, lambda-microvms.authentication.abc.def".parse().unwrap());
        h.append(http::header::SEC_WEBSOCKET_PROTOCOL, "lambda-microvms.port.9000, chat.v2".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("abc.def"));
        assert!(take_subprotocols(&mut h));
        assert_eq!(h[AUTH_HEADER], "abc.def");
        assert_eq!(h[PORT_HEADER], "9000");
        assert_eq!(h[http::header::SEC_WEBSOCKET_PROTOCOL], "chat.v2");
        // Headers win; nothing else offered leaves no subprotocol header for the app.
        let mut h = http::HeaderMap::new();
        h.insert(AUTH_HEADER, "from-header".parse().unwrap());
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, "lambda-microvms.authentication.other".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("from-header"));
        assert!(!take_subprotocols(&mut h));
        assert_eq!(h[AUTH_HEADER], "from-header");
        assert!(!h.contains_key(http::header::SEC_WEBSOCKET_PROTOCOL));
        let mut h = http::HeaderMap::new();
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, "hearth-shell, hearth-token.t.u".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("t.u"));
    }
}
