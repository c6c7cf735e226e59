//! The relay of one running microvm, or of one image build's builder VM: keeps
//! [`PENDING`] metadata accepts open on its agent channel and serves each guest connection
//! they bring with HTTP/1.1 ([`super::route`] for `/latest/…`, the daemon's API for the
//! rest).
//!
//! A microvm's credentials are its record's `executionRoleArn` (read at each request);
//! a build's are its version's `buildRoleArn`, issued for [`BUILD_CREDENTIALS_TTL`] to the
//! build's subject ([`Build::subject`]) so that revoking that subject's sessions ends them
//! all (before the template snapshot and at the end of the build).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections served at once per microvm (more wait
//! in the agent's queue, then the guest kernel's backlog), headers read within
//! [`HEADER_TIMEOUT`], a request's head and body bounded as the API bounds them, and a
//! connection lives at most [`CONNECTION_LIFETIME`]. The relay ends when its VM's agent
//! connection ends, or when it is stopped (suspend, terminate): then every connection it
//! serves is cut and its pending accepts are reset.

use super::{credentials_json, credentials_ttl, identity_json, needs_refresh, pass_through, role_name, route, Route, Tokens, TTL_HEADER};
use crate::clock::now;
use crate::service::{Service, SessionCredentials};
use axum::body::Body;
use hearth_vmm::agent::{AgentClient, AgentError};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Accepts kept pending on the agent channel.
pub const PENDING: usize = 4;
/// Guest connections served at once, per microvm.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a guest has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a guest connection is kept.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// How long a build's credentials live: short, since a builder's RAM becomes a template
/// (they are revoked before that anyway, and refreshed as a microvm's are).
pub const BUILD_CREDENTIALS_TTL: u64 = 900;

/// The image build a builder VM's relay serves.
#[derive(Debug, Clone)]
pub struct Build {
    /// The build's subject: what its sessions are issued to (their `hearth:SourceMicrovm`)
    /// and revoked by ([`Service::revoke_sessions`]); the version's build id.
    pub subject: String,
    /// The image's ARN.
    pub image_arn: String,
    /// The version built.
    pub version: u32,
    /// The version's `buildRoleArn` (`None`: no credentials, as a microvm without a role).
    pub role: Option<String>,
    /// When the build started (seconds since the epoch).
    pub started_at: f64,
}

/// Whose VM a relay serves.
enum Subject {
    /// A microvm, by id: its record says its role and lifetime.
    Microvm(String),
    /// An image build.
    Build(Build),
}

/// What the relay of one VM knows: who it is (from the channel) and its tokens and
/// credentials.
struct Instance {
    account: String,
    /// The microvm's id or the build's subject: sessions are issued to it.
    id: String,
    subject: Subject,
    tokens: std::sync::Mutex<Tokens>,
    /// The last credentials: role, credentials, when issued.
    creds: tokio::sync::Mutex<Option<(String, SessionCredentials, f64)>>,
}

/// A running relay; dropping it stops it (without waiting), [`Relay::stop`] waits.
pub struct Relay {
    vm_id: String,
    stop: Option<watch::Sender<()>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// Held by each connection served ([`MAX_CONNECTIONS`]): all back once none is.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Relay {
    /// Starts relaying microvm `microvm` (of `account`), whose VM `vm_id` answers on `agent`.
    pub fn start(svc: Arc<Service>, agent: AgentClient, account: &str, microvm: &str, vm_id: &str) -> Relay {
        Relay::begin(svc, agent, account, Subject::Microvm(microvm.to_owned()), vm_id)
    }

    /// Starts relaying for image build `build` (of `account`), whose builder VM `vm_id`
    /// answers on `agent`.
    pub fn start_build(svc: Arc<Service>, agent: AgentClient, account: &str, build: Build, vm_id: &str) -> Relay {
        Relay::begin(svc, agent, account, Subject::Build(build), vm_id)
    }

    fn begin(svc: Arc<Service>, agent: AgentClient, account: &str, subject: Subject, vm_id: &str) -> Relay {
        let id = match &subject {
            Subject::Microvm(m) => m.clone(),
            Subject::Build(b) => b.subject.clone(),
        };
        let inst = Arc::new(Instance { account: account.to_owned(), id, subject, tokens: Default::default(), creds: Default::default() });
        let (tx, rx) = watch::channel(());
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let workers =
            (0..PENDING).map(|_| tokio::spawn(worker(svc.clone(), agent.clone(), inst.clone(), permits.clone(), rx.clone()))).collect();
        Relay { vm_id: vm_id.to_owned(), stop: Some(tx), workers, permits }
    }

    /// The VM it relays for.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// Stops it and waits (a few seconds at most) until its accepts are withdrawn and
    /// every connection it served has ended, so the agent connection has no stream of the
    /// relay's left (before a snapshot's detach) and no request is still being answered
    /// (credentials revoked after the stop are all that were handed out).
    pub async fn stop(mut self) {
        drop(self.stop.take());
        for w in std::mem::take(&mut self.workers) {
            let abort = w.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), w).await.is_err() {
                abort.abort();
            }
        }
        // Each connection's task holds a permit until it ends (they end on the stop).
        if tokio::time::timeout(Duration::from_secs(3), self.permits.acquire_many(MAX_CONNECTIONS as u32)).await.is_err() {
            tracing::warn!(vm = %self.vm_id, "metadata connections still open 3 s after the relay's stop");
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        for w in &self.workers {
            w.abort();
        }
    }
}

/// One pending accept after another, until the relay stops or the agent goes.
async fn worker(
    svc: Arc<Service>,
    agent: AgentClient,
    inst: Arc<Instance>,
    permits: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let accepted = tokio::select! {
            r = agent.accept_metadata() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok(io) => {
                let (svc, inst, stop) = (svc.clone(), inst.clone(), stop.clone());
                tokio::spawn(async move {
                    serve(svc, inst, io, stop).await;
                    drop(permit);
                });
            }
            // Agents answer an unknown route with 404 InvalidInput "no route for …".
            Err(AgentError::Remote(b))
                if b.code == hearth_proto::ErrorCode::NotFound
                    || (b.code == hearth_proto::ErrorCode::InvalidInput && b.message.starts_with("no route for")) =>
            {
                // An agent from before the metadata service: the guest has none.
                tracing::debug!(subject = %inst.id, "the guest's agent has no metadata listener");
                return;
            }
            Err(e) if e.is_disconnect() => return,
            Err(e) => {
                tracing::warn!(subject = %inst.id, error = %e, "metadata accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Serves one guest connection with HTTP/1.1.
async fn serve(svc: Arc<Service>, inst: Arc<Instance>, io: tokio::io::DuplexStream, mut stop: watch::Receiver<()>) {
    let api = hyper_util::service::TowerToHyperService::new(crate::server::router(svc.clone()));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (svc, inst, api) = (svc.clone(), inst.clone(), api.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(&svc, &inst, &api, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        _ = stop.changed() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
}

type Api = hyper_util::service::TowerToHyperService<axum::Router>;

async fn handle(svc: &Arc<Service>, inst: &Instance, api: &Api, req: Request<Incoming>) -> Response<Body> {
    use hyper::service::Service as _;
    let path = req.uri().path().to_owned();
    // Origin-form only: an absolute URI could name another host than the Host header.
    if req.uri().authority().is_some() {
        return text(StatusCode::BAD_REQUEST, "absolute request targets are not accepted here");
    }
    if path == "/latest" || path.starts_with("/latest/") {
        return metadata(svc, inst, &req, &path).await;
    }
    if let Err(why) = pass_through(req.headers(), &path) {
        return text(StatusCode::BAD_REQUEST, why);
    }
    match api.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Body::from(body.into()))
        .expect("static response parts")
}

fn json(v: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .expect("static response parts")
}

async fn metadata(svc: &Service, inst: &Instance, req: &Request<Incoming>, path: &str) -> Response<Body> {
    let t = now();
    let r = {
        let tokens = inst.tokens.lock().unwrap_or_else(|p| p.into_inner());
        route(req.method(), path, req.headers(), &tokens, t, &inst.id)
    };
    match r {
        Route::Token(ttl) => {
            let token = crate::keys::random_hex(32);
            inst.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(token.clone(), t + ttl as f64, t);
            let mut resp = text(StatusCode::OK, token);
            resp.headers_mut().insert(TTL_HEADER, ttl.into());
            resp
        }
        Route::Refuse(status, msg) => text(status, msg),
        Route::Text(body) => text(StatusCode::OK, body),
        Route::Identity => match &inst.subject {
            Subject::Build(b) => {
                let mut doc = identity_json(&inst.account, &inst.id, b.started_at, arch());
                doc["imageId"] = b.image_arn.clone().into();
                doc["imageVersion"] = b.version.to_string().into();
                doc["instanceType"] = "microvm-image-build".into();
                json(&doc)
            }
            Subject::Microvm(id) => match svc.imds_record(&inst.account, id).await {
                Ok(Some(m)) => json(&identity_json(&inst.account, id, m.started_at, arch())),
                Ok(None) => text(StatusCode::NOT_FOUND, "Not Found"),
                Err(e) => internal(inst, &e),
            },
        },
        Route::RoleName | Route::IamInfo | Route::Credentials(_) => {
            // The role, and how long its credentials live if issued now.
            let (role, ttl) = match &inst.subject {
                Subject::Build(b) => (b.role.clone(), BUILD_CREDENTIALS_TTL),
                Subject::Microvm(id) => match svc.imds_record(&inst.account, id).await {
                    Ok(Some(m)) => (
                        m.spec.get("executionRoleArn").and_then(|v| v.as_str()).map(str::to_owned),
                        credentials_ttl(t, m.started_at + m.maximum_duration_in_seconds as f64),
                    ),
                    Ok(None) => (None, 0),
                    Err(e) => return internal(inst, &e),
                },
            };
            // No execution role: no credentials, as an instance without a profile.
            let Some(role) = role else { return text(StatusCode::NOT_FOUND, "Not Found") };
            match r {
                Route::RoleName => text(StatusCode::OK, role_name(&role)),
                Route::IamInfo => json(&serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": super::rfc3339(t),
                    "InstanceProfileArn": role,
                    "InstanceProfileId": inst.id,
                })),
                Route::Credentials(name) if name == role_name(&role) => match credentials(svc, inst, &role, t, ttl).await {
                    Ok((c, issued)) => json(&credentials_json(&c, issued)),
                    Err(e) if e.status() < 500 => {
                        tracing::info!(subject = %inst.id, error = %e, "no credentials for the guest");
                        text(StatusCode::NOT_FOUND, format!("the role's credentials cannot be issued: {}", e.message))
                    }
                    Err(e) => internal(inst, &e),
                },
                _ => text(StatusCode::NOT_FOUND, "Not Found"),
            }
        }
    }
}

/// The VM's credentials for `role`: the last ones while fresh, else new ones living `ttl`
/// seconds.
async fn credentials(
    svc: &Service,
    inst: &Instance,
    role: &str,
    t: f64,
    ttl: u64,
) -> Result<(SessionCredentials, f64), crate::error::ApiError> {
    let mut cached = inst.creds.lock().await;
    if let Some((r, c, issued)) = cached.as_ref() {
        if r == role && !needs_refresh(*issued, c.expiration, t) {
            return Ok((c.clone(), *issued));
        }
    }
    let session = format!("hearth-{}", inst.id);
    let c = svc.issue_session(&inst.account, role, &session, Some(&inst.id), ttl).await?;
    *cached = Some((role.to_owned(), c.clone(), t));
    Ok((c, t))
}

fn internal(inst: &Instance, e: &dyn std::fmt::Display) -> Response<Body> {
    tracing::error!(subject = %inst.id, error = %e, "metadata request failed");
    text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
}

/// The guest architecture's EC2 name.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    }
}
