//! `/mcp` on the API listener: the Model Context Protocol server of `hearth mcp`, served
//! by the daemon for its tenants, and the tokens that open it.
//!
//! MCP clients (Claude, Cursor, agent frameworks) cannot sign SigV4; they send
//! `Authorization: Bearer <token>`. A tenant mints a token with a signed extension call,
//! `POST /hearth/v1/mcp-tokens` ([`mint`]; `hearth mcp token`): an HMAC token of the
//! daemon's token key ([`crate::ingress::TokenKey`]) whose claims carry the account, the
//! access key id it was minted with, its expiry (1-1440 minutes) and the scope
//! [`MCP_SCOPE`], so it opens `/mcp` and nothing else (endpoint and shell tokens check
//! their own scope, and this one names no microvm). Role session credentials cannot mint
//! one: a token would outlive the session.
//!
//! Each request to `/mcp` ([`serve`]) is checked here — the token, its scope, its expiry,
//! that the access key still exists and is the account's, and the account's request
//! rate — and then handed with the tenant ([`McpTenant`]) to the daemon's MCP hook
//! ([`McpHook`]; the tool server lives in the CLI crate, which puts it in
//! [`crate::server::ServeConfig::mcp`]). The hook acts as a client of this API signed with
//! that key: whatever a tool does, the tenant's own key could do by hand.
//!
//! Routing: a microvm's own host (`<id>.<domain>`) is routed to the microvm before this,
//! so `/mcp` on an endpoint host always reaches the app.

use crate::auth::{Caller, Principal};
use crate::error::{ApiError, Kind};
use crate::service::Service;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The scope of MCP tokens ([`crate::ingress::Claims::k`]).
pub const MCP_SCOPE: &str = "mcp";
/// A token's life when the request names none.
pub const DEFAULT_MINUTES: u64 = 60;

/// The tenant a valid MCP token speaks for, with the access key it was minted with.
pub struct McpTenant {
    /// The 12-digit account.
    pub account: String,
    /// The access key id the token was minted with.
    pub access_key: String,
    /// That key's secret (opened from the store; never logged).
    pub secret: String,
    /// The token's own id (its MAC): one MCP session per token.
    pub token_id: String,
    /// The token's expiry, seconds since the epoch.
    pub expires: u64,
    /// Where the hook reaches this API (the listener's loopback address).
    pub api_url: String,
    /// The API's URL as clients reach it (endpoints' path form is under it).
    pub public_url: String,
}

impl std::fmt::Debug for McpTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpTenant").field("account", &self.account).field("access_key", &self.access_key).finish_non_exhaustive()
    }
}

/// A response, later.
pub type McpFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// What serves an authenticated `/mcp` request.
pub trait McpHandler: Send + Sync + 'static {
    /// Answers `req` (its path `/mcp` or beneath) for `tenant`.
    fn handle(&self, tenant: McpTenant, req: Request) -> McpFuture;
}

/// The daemon's MCP server, as [`crate::server::ServeConfig::mcp`] takes it.
#[derive(Clone)]
pub struct McpHook(pub Arc<dyn McpHandler>);

/// The hook and where it reaches the API: an extension of the API listener's router.
#[derive(Clone)]
pub(crate) struct McpRoute {
    pub(crate) hook: McpHook,
    pub(crate) api_url: String,
}

impl McpRoute {
    /// The route for a listener bound at `addr` (reached over loopback when it listens on
    /// every address).
    pub(crate) fn new(hook: McpHook, addr: std::net::SocketAddr) -> McpRoute {
        let mut a = addr;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        McpRoute { hook, api_url: format!("http://{a}") }
    }
}

/// Whether `path` is the MCP server's.
pub fn is_mcp_path(path: &str) -> bool {
    path == "/mcp" || path.starts_with("/mcp/")
}

/// 401 with a JSON message saying how to get in.
fn unauthorized(why: &str) -> Response {
    let body = json!({
        "message": format!("{why}: /mcp needs `Authorization: Bearer <token>` with a token from `hearth mcp token` (POST /hearth/v1/mcp-tokens, signed)"),
    });
    (
        http::StatusCode::UNAUTHORIZED,
        [(http::header::WWW_AUTHENTICATE, "Bearer realm=\"hearth-mcp\""), (http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `POST /hearth/v1/mcp-tokens` by `caller` (SigV4 already verified): `{"expirationInMinutes":
/// 1-1440}` (default 60) → `{token, url, expiresAt}`.
pub fn mint(svc: &Service, caller: &Caller, method: &http::Method, body: &[u8]) -> Response {
    match mint_token(svc, caller, method, body) {
        Ok(v) => (http::StatusCode::OK, [(http::header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => e.into_response(),
    }
}

fn mint_token(svc: &Service, caller: &Caller, method: &http::Method, body: &[u8]) -> Result<Value, ApiError> {
    if method != http::Method::POST {
        return Err(ApiError::new(
            Kind::UnknownOperation,
            format!("no Hearth extension at {method} /hearth/v1/mcp-tokens (POST mints a token)"),
        ));
    }
    if let Principal::Role { .. } = caller.principal {
        return Err(ApiError::new(
            Kind::AccessDenied,
            format!(
                "{} cannot mint MCP tokens: a token would outlive the role session; sign with the account's own access key",
                caller.arn()
            ),
        ));
    }
    let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::validation(format!("mcp-tokens body is not JSON: {e}")))?
    };
    let minutes = match v.get("expirationInMinutes") {
        None | Some(Value::Null) => DEFAULT_MINUTES,
        Some(n) => n.as_u64().filter(|m| (1..=crate::ingress::MAX_TOKEN_MINUTES).contains(m)).ok_or_else(|| {
            ApiError::validation(format!("expirationInMinutes must be a whole number from 1 to {}", crate::ingress::MAX_TOKEN_MINUTES))
        })?,
    };
    let expires = crate::clock::now() as u64 + minutes * 60;
    let claims = crate::ingress::Claims {
        a: caller.account.clone(),
        // An MCP token names the access key it was minted with where others name a microvm;
        // its scope keeps it from opening any microvm.
        m: caller.access_key.clone(),
        e: expires,
        p: Vec::new(),
        k: Some(MCP_SCOPE.to_owned()),
    };
    let token = svc.token_key.issue(&claims);
    tracing::info!(account = %caller.account, access_key = %caller.access_key, minutes, "MCP token minted");
    Ok(json!({ "token": token, "url": format!("{}/mcp", svc.public_url.trim_end_matches('/')), "expiresAt": expires }))
}

/// Serves one request to `/mcp` (or beneath): authenticated by its bearer token, then
/// answered by the daemon's MCP hook.
pub async fn serve(svc: Arc<Service>, req: Request) -> Response {
    let Some(route) = req.extensions().get::<McpRoute>().cloned() else {
        return ApiError::new(
            Kind::UnknownOperation,
            "no MCP server here: the daemon was started with --no-mcp, or this is not its API listener",
        )
        .into_response();
    };
    let Some(auth) = req.headers().get(http::header::AUTHORIZATION) else {
        return unauthorized("missing bearer token");
    };
    let Some(token) = auth.to_str().ok().and_then(|s| s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer "))).map(str::trim)
    else {
        return unauthorized("the Authorization header is not a bearer token");
    };
    let claims = match svc.token_key.verify(token, crate::clock::now() as u64) {
        Ok(c) => c,
        Err(why) => return unauthorized(why),
    };
    if claims.k.as_deref() != Some(MCP_SCOPE) {
        return unauthorized("this token does not open the MCP server");
    }
    let key = match svc.access_key(&claims.m).await {
        Some(k) if k.account == claims.a => k,
        _ => return unauthorized("the access key this token was minted with no longer exists"),
    };
    if let Err(e) = svc.throttle(&key.account).await {
        return e.into_response();
    }
    let token_id = token.rsplit('.').next().unwrap_or_default().to_owned();
    let tenant = McpTenant {
        account: key.account,
        access_key: key.access_key,
        secret: key.secret,
        token_id,
        expires: claims.e,
        api_url: route.api_url.clone(),
        public_url: svc.public_url.clone(),
    };
    route.hook.0.handle(tenant, req).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_mcp_paths_are_the_mcp_servers() {
        for p in ["/mcp", "/mcp/", "/mcp/x"] {
            assert!(super::is_mcp_path(p), "{p}");
        }
        for p in ["/mcpx", "/", "/hearth/v1/mcp-tokens", "/microvms/mvm-1/mcp"] {
            assert!(!super::is_mcp_path(p), "{p}");
        }
    }
}
