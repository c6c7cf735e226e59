//! The daemon's MCP server: `hearth serve` answers Streamable HTTP MCP at `/mcp` on its API
//! listener, for requests `hearth_api::mcp_route` has authenticated (a bearer token from
//! `POST /hearth/v1/mcp-tokens`, of the scope that opens only this).
//!
//! A token is one agent session: its own [`Hub`] (current sandbox, created lazily; the
//! sandboxes it made; background processes), signing as a client of the daemon's own API
//! with the access key the token was minted with, so a tool can do exactly what that key
//! could do by hand and nothing of another account's. Hubs are made on a token's first
//! request and bounded: at most [`Limits::max_sessions`] live (the least recently used one
//! that is idle gives way to a new one; else the request is refused with 503), at most
//! [`PER_ACCOUNT`] per account (a new one replaces the account's least recently used), at
//! most [`MCP_SESSIONS_PER_TOKEN`] protocol sessions each. A hub idle for
//! [`Limits::idle`], or whose token expired, is dropped; its sandboxes then become what
//! the operator's `--mcp-on-exit` says (suspend by default), as when a `hearth mcp`
//! process ends. When the daemon stops, hubs are not finished (the API they would call is
//! going away): their sandboxes keep their idle policies.

use super::hub::{Hub, OnExit, Options};
use super::HearthMcp;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hearth_api::mcp_route::{McpFuture, McpHandler, McpHook, McpTenant};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hubs one account may hold at once.
pub const PER_ACCOUNT: usize = 8;
/// Open protocol sessions (pre-2026-07-28 clients) per token.
pub const MCP_SESSIONS_PER_TOKEN: usize = 16;
/// A hub used this recently is never dropped to make room.
const BUSY: Duration = Duration::from_secs(60);

/// The operator's settings of the daemon's MCP server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Hubs live at once, all accounts together.
    pub max_sessions: usize,
    /// A hub unused this long is dropped.
    pub idle: Duration,
    /// What a dropped hub's sandboxes become.
    pub on_exit: OnExit,
    /// The managed base of the default image (`hearth-mcp-<base>` in each account).
    pub base: String,
}

/// One token's session.
struct Session {
    hub: Arc<Hub>,
    account: String,
    expires: u64,
    service: StreamableHttpService<HearthMcp, LocalSessionManager>,
    sessions: Arc<LocalSessionManager>,
    /// Ends its protocol sessions when the hub is dropped.
    stop: tokio_util::sync::CancellationToken,
    last_used: Mutex<Instant>,
}

impl Session {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used.lock().map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// Marks its session used when the response it rides on ends (SSE streams included).
struct InFlight(Arc<Session>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
    }
}

/// The daemon's MCP server: the hubs by token.
pub struct DaemonMcp {
    limits: Limits,
    hubs: Mutex<HashMap<String, Arc<Session>>>,
}

impl DaemonMcp {
    /// The hook `hearth serve` hands the API; sweeps idle hubs every minute.
    pub fn hook(limits: Limits) -> McpHook {
        let me = Arc::new(DaemonMcp { limits, hubs: Mutex::new(HashMap::new()) });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                match weak.upgrade() {
                    Some(me) => me.sweep(),
                    None => return,
                }
            }
        });
        McpHook(me)
    }

    /// Drops hubs idle too long or whose token expired (none with a request in flight).
    fn sweep(&self) {
        let now = hearth_api::clock::now() as u64;
        let gone: Vec<Arc<Session>> = {
            let Ok(mut hubs) = self.hubs.lock() else { return };
            let ids: Vec<String> = hubs
                .iter()
                .filter(|(_, s)| Arc::strong_count(s) == 1 && (s.expires <= now || s.idle_for() >= self.limits.idle))
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| hubs.remove(k)).collect()
        };
        for s in gone {
            finish(s);
        }
    }

    /// The session of `t`'s token, made now if it has none.
    fn session(&self, t: &McpTenant) -> Result<Arc<Session>, Response> {
        let mut evicted = Vec::new();
        let s = {
            let mut hubs = self.hubs.lock().map_err(|_| busy("the MCP server's state is poisoned; restart the daemon"))?;
            if let Some(s) = hubs.get(&t.token_id) {
                s.touch();
                return Ok(s.clone());
            }
            // The least recently used session of `account` (any account: None), and how long
            // it has been idle; `free`: only one with no response in flight.
            let lru = |hubs: &HashMap<String, Arc<Session>>, account: Option<&str>, free: bool| {
                hubs.iter()
                    .filter(|(_, s)| account.is_none_or(|a| s.account == a) && (!free || Arc::strong_count(s) == 1))
                    .max_by_key(|(_, s)| s.idle_for())
                    .map(|(k, s)| (k.clone(), s.idle_for()))
            };
            if hubs.values().filter(|s| s.account == t.account).count() >= PER_ACCOUNT {
                if let Some((k, _)) = lru(&hubs, Some(&t.account), false) {
                    evicted.extend(hubs.remove(&k));
                }
            }
            if hubs.len() >= self.limits.max_sessions {
                // Another tenant's session gives way only when idle, never mid-response
                // (a long `bash` on an SSE stream).
                match lru(&hubs, None, true) {
                    Some((k, idle)) if idle >= BUSY => evicted.extend(hubs.remove(&k)),
                    _ => {
                        return Err(busy(&format!(
                            "the daemon's MCP server has {} sessions in use (its limit); retry in a minute",
                            hubs.len()
                        )))
                    }
                }
            }
            let s = Arc::new(self.new_session(t));
            hubs.insert(t.token_id.clone(), s.clone());
            s
        };
        for e in evicted {
            finish(e);
        }
        Ok(s)
    }

    fn new_session(&self, t: &McpTenant) -> Session {
        let api = hearth_api::client::Client::new(&t.api_url, &t.access_key, &t.secret);
        let opts = Options {
            image: None,
            base: self.limits.base.clone(),
            idle_seconds: 900,
            suspended_seconds: 86_400,
            on_exit: self.limits.on_exit,
            // The client is elsewhere: the daemon host's files are not the tenant's.
            host_files: false,
            endpoint: t.public_url.clone(),
        };
        let hub = Arc::new(Hub::new(api, opts));
        // Any Host: the bearer token is the authentication (a DNS-rebound browser page has
        // none), and the daemon may be reached by any name its operator gives it.
        let config = StreamableHttpServerConfig::default().disable_allowed_hosts();
        let stop = config.cancellation_token.clone();
        let sessions = Arc::new(LocalSessionManager::default());
        let server = HearthMcp::new(hub.clone());
        let service = StreamableHttpService::new(move || Ok(server.clone()), sessions.clone(), config);
        tracing::info!(account = %t.account, access_key = %t.access_key, "MCP session started");
        Session { hub, account: t.account.clone(), expires: t.expires, service, sessions, stop, last_used: Mutex::new(Instant::now()) }
    }
}

/// 503 with a JSON message.
fn busy(msg: &str) -> Response {
    let body = serde_json::json!({ "message": msg });
    (http::StatusCode::SERVICE_UNAVAILABLE, [("content-type", "application/json"), ("retry-after", "60")], body.to_string()).into_response()
}

/// Ends a dropped session: its protocol sessions close, its sandboxes become what
/// `--mcp-on-exit` says.
fn finish(s: Arc<Session>) {
    s.stop.cancel();
    let (hub, account) = (s.hub.clone(), s.account.clone());
    tokio::spawn(async move {
        tracing::info!(%account, "MCP session ended");
        hub.finish().await;
    });
}

impl McpHandler for DaemonMcp {
    fn handle(&self, tenant: McpTenant, req: axum::extract::Request) -> McpFuture {
        let session = self.session(&tenant);
        Box::pin(async move {
            let s = match session {
                Ok(s) => s,
                Err(r) => return r,
            };
            // A new protocol session (clients before MCP 2026-07-28) only while the token
            // has room for it; idle ones close by themselves after 5 minutes.
            if req.method() == http::Method::POST
                && !req.headers().contains_key("mcp-session-id")
                && s.sessions.sessions.read().await.len() >= MCP_SESSIONS_PER_TOKEN
            {
                let body = serde_json::json!({ "message": format!("this token has {MCP_SESSIONS_PER_TOKEN} MCP sessions open (its limit): close one (DELETE) or wait for one to expire") });
                return (
                    http::StatusCode::TOO_MANY_REQUESTS,
                    [("content-type", "application/json"), ("retry-after", "60")],
                    body.to_string(),
                )
                    .into_response();
            }
            let resp = s.service.handle(req).await;
            let guard = InFlight(s);
            let (parts, body) = resp.into_parts();
            let body = axum::body::Body::new(body).into_data_stream().map(move |chunk| {
                let _ = &guard;
                chunk
            });
            Response::from_parts(parts, axum::body::Body::from_stream(body))
        })
    }
}
