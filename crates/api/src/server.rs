//! The HTTP side: every request is read (bounded), authenticated with SigV4, routed by
//! the model, validated, made idempotent where the model has a `clientToken`, and answered
//! with the model's status codes and error shapes. Hearth's own extensions live under
//! `/hearth/v1/` (same authentication; described by `/hearth/v1/openapi.json`); `/health`
//! needs none; `/metrics` is served apart, on the operator's listener
//! ([`ServeConfig::metrics_listen`], [`crate::metrics::router`]), and here is refused like
//! any unsigned request. Microvm endpoints — by host name (`<id>.<domain>`, routed first,
//! [`crate::endpoint`]; also over TLS, [`crate::tls`]) or by path (`/microvms/<id>/…`,
//! [`crate::ingress`]) — and shells (`/shell/<id>`, [`crate::shell`]) are authenticated
//! by their tokens instead.

use crate::error::{ApiError, Kind};
use crate::model::model;
use crate::service::{unknown_operation, Service};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// The router.
pub fn router(svc: Arc<Service>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(svc)
}

pub(crate) fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
            (dec(k), dec(v))
        })
        .collect()
}

pub(crate) fn json_response(status: u16, v: &Value) -> Response {
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if status == http::StatusCode::NO_CONTENT {
        return status.into_response();
    }
    (status, [("content-type", "application/json")], v.to_string()).into_response()
}

async fn handle(State(svc): State<Arc<Service>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    // A microvm's own host is its app (or shell), never the API: routed before anything else.
    if let Some(id) = crate::endpoint::request_host(&parts).and_then(|h| svc.endpoints.microvm_of(h)) {
        let id = id.to_owned();
        return crate::endpoint::serve(svc, Request::from_parts(parts, body), id).await;
    }
    let path = parts.uri.path().to_owned();
    match (parts.method.as_str(), path.as_str()) {
        ("GET", "/health") => return (http::StatusCode::OK, "ok\n").into_response(),
        ("GET", "/hearth/v1/openapi.json") => return json_response(200, &crate::extensions::openapi()),
        _ => {}
    }
    // The daemon's MCP server: bearer-token authenticated (crate::mcp_route).
    if crate::mcp_route::is_mcp_path(&path) {
        return crate::mcp_route::serve(svc, Request::from_parts(parts, body)).await;
    }
    // Shells: token-authenticated WebSockets to a terminal in the microvm.
    if let Some(id) = path.strip_prefix("/shell/") {
        let id = percent_encoding::percent_decode_str(id.trim_end_matches('/')).decode_utf8_lossy().into_owned();
        return crate::shell::serve(svc, Request::from_parts(parts, body), id).await;
    }
    // Code artifact uploads: authenticated before the body is read, then streamed to disk.
    if parts.method == http::Method::POST && path == "/hearth/v1/artifacts" {
        return crate::upload::receive(svc, parts, body).await;
    }
    // File writes that claim their body's hash: authenticated first, then streamed to the agent.
    if let Some(target) = crate::files::streamed_write(&parts.method, &path, &parts.headers) {
        return crate::files::receive(svc, parts, body, target).await;
    }
    // Microvm endpoints: token-authenticated, proxied to the app.
    if let Some(rest) = path.strip_prefix("/microvms/") {
        let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let (id, rest) = (id.to_owned(), rest.to_owned());
        let req = Request::from_parts(parts, body);
        return crate::ingress::proxy(svc, req, id, rest, crate::ingress::Form::Path).await;
    }
    // Bounded; an oversized body is refused (413) once the request is authenticated.
    let bytes = match crate::body::read(&svc, &parts, body).await {
        Ok(b) => b,
        Err(e) => {
            svc.metrics.request("body", e.status());
            return e.into_response();
        }
    };
    let key = svc.claimed_key(&parts.headers).await;
    let signed = crate::sigv4::verify(&parts.method, &parts.uri, &parts.headers, &bytes, crate::clock::system(), |k| {
        key.as_ref().filter(|x| x.access_key == k).map(|x| x.secret.clone())
    });
    // IAM, STS, Secrets Manager and KMS are served at `POST /`, in their own protocols.
    let aws = parts.method == http::Method::POST && path == "/";
    let protocol = crate::aws::protocol_of(&parts.headers);
    // Refusals at `POST /` in the protocol's shape (the query services' own codes).
    let refuse_aws = |e: crate::aws::AwsError| {
        let e = if protocol == crate::aws::Protocol::Query { crate::aws::query::to_query(e) } else { e };
        crate::aws::error_response(protocol, &e)
    };
    let refuse = |e: ApiError| if aws { refuse_aws(e.into()) } else { e.into_response() };
    let (key, service) = match signed.and_then(|s| {
        let k =
            key.filter(|k| k.access_key == s.access_key).ok_or_else(|| ApiError::new(Kind::UnrecognizedClient, "unknown access key"))?;
        Ok((k, s.service))
    }) {
        Ok(c) => c,
        Err(e) => {
            svc.metrics.request("auth", e.status());
            return refuse(e);
        }
    };
    // The account's root, or a role session once its token checks out.
    let caller = match svc.caller_of(&parts.headers, &key).await {
        Ok(c) => c,
        Err(r) => {
            let r = if aws { refuse_aws(r.into_aws(protocol == crate::aws::Protocol::Json)) } else { r.into_api().into_response() };
            svc.metrics.request("auth", r.status().as_u16());
            return r;
        }
    };
    let account = caller.account.clone();
    // The account's request rate, before anything of the call runs.
    if let Err(e) = svc.throttle(&account).await {
        svc.metrics.request("throttled", e.status());
        return refuse(e);
    }
    if aws && crate::aws::is_aws_service(&service) {
        let r = crate::aws::dispatch(&svc, &caller, &service, &parts.headers, bytes).await;
        svc.metrics.request(&service, r.status().as_u16());
        tracing::info!(%service, %account, status = r.status().as_u16(), ms = started.elapsed().as_secs_f64() * 1000.0, "aws call");
        return r;
    }
    if service != crate::sigv4::SERVICE {
        let e = ApiError::new(
            Kind::InvalidSignature,
            format!("credential scope names service {service:?}; the Lambda MicroVMs API and Hearth's extensions sign as \"lambda\""),
        );
        svc.metrics.request("auth", e.status());
        return e.into_response();
    }
    if path == "/hearth/v1/mcp-tokens" {
        return crate::mcp_route::mint(&svc, &caller, &parts.method, &bytes);
    }
    if let Some(rest) = path.strip_prefix("/hearth/v1/") {
        let (action, resource) = crate::auth::extension_action(&parts.method, &path, &account);
        if let Err(e) = crate::auth::authorize(&svc, &caller, &action, &resource).await {
            return e.into_response();
        }
        return match crate::extensions::extension(&svc, &account, &parts.method, rest, parts.uri.query(), bytes).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let (op, params) = match model().route(&parts.method, &path) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    // The call runs as a task of its own: a client that goes away mid-call (its timeout, a
    // dropped connection) does not cut an operation half-way (a resume, a launch); its
    // retry finds the result through the clientToken, or the state the call left.
    let task = {
        let (svc, account, headers, query, bytes) =
            (svc.clone(), account.clone(), parts.headers.clone(), parts.uri.query().map(str::to_owned), bytes.clone());
        async move {
            crate::body::check_content_type(&headers, &bytes)?;
            let input = model().parse_input(op, &params, &query_pairs(query.as_deref()), &bytes)?;
            let action = format!("lambda:{}", op.name);
            crate::auth::authorize(&svc, &caller, &action, &crate::auth::operation_resource(&input, &account)).await?;
            // Handing a role or a KMS key to a microvm or a build needs the caller's own
            // permission on it, as on AWS (iam:PassRole; kms:GenerateDataKey and kms:Decrypt).
            crate::auth::authorize_handed_over(&svc, &caller, &input).await?;
            let token = input.get("clientToken").and_then(Value::as_str).map(str::to_owned);
            let hash = {
                let mut without = input.clone();
                without.remove("clientToken");
                format!("{:x}", Sha256::digest(Value::Object(without).to_string()))
            };
            if let Some(t) = &token {
                // Claimed before the call runs, so two concurrent retries cannot both run it.
                if let Some((h, resp)) = svc.claim(&account, &op.name, t, &hash).await? {
                    if h != hash {
                        return Err(ApiError::conflict(&op.name, t, "clientToken was already used with different parameters"));
                    }
                    if resp.is_empty() {
                        return Err(ApiError::conflict(&op.name, t, "a call with this clientToken is still in progress; retry shortly"));
                    }
                    return serde_json::from_str(&resp).map_err(ApiError::internal);
                }
            }
            let out = dispatch(&svc, &account, &op.name, &input).await.and_then(|v| checked_output(op, v));
            if let Some(t) = &token {
                match &out {
                    Ok(v) => svc.remember(&account, &op.name, t, &hash, &v.to_string()).await?,
                    Err(_) => svc.unclaim(&account, &op.name, t).await?,
                }
            }
            out
        }
    };
    let result = tokio::spawn(task).await.unwrap_or_else(|e| Err(ApiError::internal(e)));
    let status = result.as_ref().map_or_else(ApiError::status, |_| op.status);
    svc.metrics.request(&op.name, status);
    tracing::info!(operation = %op.name, %account, status, ms = started.elapsed().as_secs_f64() * 1000.0, "api call");
    match result {
        Ok(v) => json_response(op.status, &v),
        Err(e) => e.into_response(),
    }
}

/// `v` when it is what the model says `op` answers. Drift is Hearth's defect: it is
/// logged, and debug builds (the test suites) answer InternalServerException so that a
/// test sees it at once.
fn checked_output(op: &crate::model::Operation, v: Value) -> Result<Value, ApiError> {
    match model().check_output(op, &v) {
        Ok(()) => Ok(v),
        Err(e) if cfg!(debug_assertions) => Err(ApiError::new(Kind::Internal, format!("{} answered outside the model: {e}", op.name))),
        Err(e) => {
            tracing::error!(operation = %op.name, drift = %e, "an answer outside the service model");
            Ok(v)
        }
    }
}

/// Runs operation `op` with its validated `input`, read as the operation's input type.
async fn dispatch(svc: &Arc<Service>, account: &str, op: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
    use crate::inputs::{parse, ResumeMicrovmRequest, SuspendMicrovmRequest, TerminateMicrovmRequest};
    match op {
        "RunMicrovm" => svc.run_microvm(account, &parse(input)?).await,
        "GetMicrovm" => svc.get_microvm(account, &parse(input)?).await,
        "ListMicrovms" => svc.list_microvms(account, &parse(input)?).await,
        "SuspendMicrovm" => svc.suspend_microvm(account, &parse::<SuspendMicrovmRequest>(input)?.microvm_identifier, None).await,
        "ResumeMicrovm" => svc.resume_microvm(account, &parse::<ResumeMicrovmRequest>(input)?.microvm_identifier).await,
        "TerminateMicrovm" => svc.terminate_microvm(account, &parse::<TerminateMicrovmRequest>(input)?.microvm_identifier, None).await,
        "CreateMicrovmImage" => svc.create_image(account, &parse(input)?).await,
        "UpdateMicrovmImage" => svc.update_image(account, &parse(input)?).await,
        "GetMicrovmImage" => svc.get_image(account, &parse(input)?).await,
        "ListMicrovmImages" => svc.list_images(account, &parse(input)?).await,
        "DeleteMicrovmImage" => svc.delete_image(account, &parse(input)?).await,
        "GetMicrovmImageVersion" => svc.get_version(account, &parse(input)?).await,
        "ListMicrovmImageVersions" => svc.list_versions(account, &parse(input)?).await,
        "UpdateMicrovmImageVersion" => svc.update_version(account, &parse(input)?).await,
        "DeleteMicrovmImageVersion" => svc.delete_version(account, &parse(input)?).await,
        "GetMicrovmImageBuild" => svc.get_build(account, &parse(input)?).await,
        "ListMicrovmImageBuilds" => svc.list_builds(account, &parse(input)?).await,
        "ListManagedMicrovmImages" => svc.list_managed(&parse(input)?),
        "ListManagedMicrovmImageVersions" => svc.list_managed_versions(&parse(input)?),
        "CreateMicrovmAuthToken" => svc.auth_token(account, &parse(input)?).await,
        "ListTags" => svc.list_tags(account, &parse(input)?).await,
        "TagResource" => svc.tag(account, &parse(input)?).await,
        "UntagResource" => svc.untag(account, &parse(input)?).await,
        "CreateMicrovmShellAuthToken" => svc.shell_token(account, &parse(input)?).await,
        other => Err(unknown_operation(other)),
    }
}

/// Raises the soft limit on open files to the hard one: every client connection is a
/// descriptor, and the default soft limit (often 1024) is below what one busy microvm's
/// endpoint may see (each microvm takes [`crate::service::MAX_INGRESS_CONNECTIONS`]).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one rlimit through valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("cannot raise the open-file limit: {}", std::io::Error::last_os_error());
            }
        }
    }
}

/// Where the daemon listens and keeps its state.
pub struct ServeConfig {
    /// Listen address.
    pub listen: std::net::SocketAddr,
    /// `$HEARTH_HOME` (images, layers, kernels).
    pub home: std::path::PathBuf,
    /// The API's own state: database, microvm and image files (`$HEARTH_HOME/api`).
    pub state_dir: std::path::PathBuf,
    /// Kernel, initramfs, accelerator, run directory for VMs.
    pub vm: hearth_vmm::VmConfig,
    /// How often the idle and lifetime policies run.
    pub policy_interval: Duration,
    /// The URL clients reach the daemon at (the path form of microvm endpoints is under
    /// it); default `http://<listen address>`.
    pub public_url: Option<String>,
    /// Microvm endpoints by host name: their domain, TLS listener and certificates.
    pub endpoints: crate::endpoint::EndpointConfig,
    /// Where `GET /metrics` is served, apart from the API (its counts and latencies are
    /// the operator's, not the tenants'); none serves no metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Destinations in the closed ranges (private, CGNAT, link-local, loopback, multicast,
    /// reserved) the operator opens to every microvm of the host: the host's egress ceiling.
    /// Tenants' allow rules may reach into them, never further; empty opens none.
    pub egress_allow_private: Vec<hearth_vmm::net::Rule>,
    /// Builds run at once; the others wait in FIFO order (`--max-concurrent-builds`;
    /// default [`crate::service::default_max_concurrent_builds`]).
    pub max_concurrent_builds: usize,
    /// What the host may hold (memory and CPU overcommit, reserves, idle reclaim).
    pub capacity: crate::capacity::Settings,
    /// The request rate of accounts without one of their own.
    pub rate_limit: crate::ratelimit::Rate,
    /// Warm pools behind RunMicrovm: their default size and CPU budget.
    pub pools: crate::service::PoolSettings,
    /// The egress of a microvm whose run and image name no connector (`--default-egress`).
    pub default_egress: crate::service::DefaultEgress,
    /// The architecture of image versions whose request names no `cpuConfigurations`
    /// (`--default-architecture`; the host's by default).
    pub default_arch: hearth_vmm::Arch,
    /// The MCP server served at `/mcp` on the API listener ([`crate::mcp_route`]); none
    /// serves none.
    pub mcp: Option<crate::mcp_route::McpHook>,
}

/// What `serve` reports once it listens.
pub struct Started {
    /// The bound address.
    pub addr: std::net::SocketAddr,
    /// The access key created on first start (printed once).
    pub first_key: Option<crate::store::AccessKey>,
    /// The bound metrics address, when metrics are served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The bound address of the endpoints' TLS listener, when there is one.
    pub endpoint_addr: Option<std::net::SocketAddr>,
    /// The CA certificate clients must trust for the endpoints, when Hearth made it.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Opens the store (creating the first tenant and key on first start), reconciles
/// microvms left by a previous run (reattaching running ones), and serves until
/// `shutdown` resolves; running VMs are then released to run on until the next start.
pub async fn serve(
    cfg: ServeConfig,
    started: impl FnOnce(Started),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let dir = cfg.state_dir.clone();
    crate::store::create_state_dir(&dir).map_err(|e| format!("create {} (owner only): {e}", dir.display()))?;
    let store = crate::store::Store::open(&dir.join("hearth.db")).map_err(|e| format!("open the database: {e}"))?;
    let token_key = crate::ingress::TokenKey::load_or_create(&dir).map_err(|e| format!("token key: {e}"))?;
    let mut service = Service::new(store, cfg.home.clone(), cfg.state_dir.clone(), cfg.vm, token_key);
    service.set_max_concurrent_builds(cfg.max_concurrent_builds);
    let first_key = service.first_key().await.map_err(|e| e.message)?;
    raise_fd_limit();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| format!("listen on {a} for metrics: {e}"))?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose().map_err(|e| e.to_string())?;
    let ep = &cfg.endpoints;
    let endpoint_listener = match ep.tls_listen {
        Some(a) => {
            let tls = crate::tls::load(&ep.certs, &dir, &ep.domain).map_err(|e| e.to_string())?;
            let l = tokio::net::TcpListener::bind(a).await.map_err(|e| format!("listen on {a} for endpoints: {e}"))?;
            Some((l, tls))
        }
        None => None,
    };
    let endpoint_addr = endpoint_listener.as_ref().map(|(l, _)| l.local_addr()).transpose().map_err(|e| e.to_string())?;
    let ca_file = endpoint_listener.as_ref().and_then(|(_, t)| t.ca_file.clone());
    service.endpoints =
        crate::endpoint::Endpoints { domain: ep.domain.to_ascii_lowercase(), port: ep.public_port.or(endpoint_addr.map(|a| a.port())) };
    // The one origin rule (docs/SECURITY.md): the API is never on an endpoint's host.
    if let Some(host) = cfg.public_url.as_deref().and_then(|u| u.parse::<http::Uri>().ok()).and_then(|u| u.host().map(str::to_owned)) {
        if service.endpoints.microvm_of(&host).is_some() {
            return Err(format!(
                "--public-url's host {host} is an endpoint host under --endpoint-domain {}: tenants' pages would share the API's origin; give the API a name outside it",
                ep.domain
            ));
        }
    }
    // Before any VM is restored or started: every namespace of this process is under it.
    crate::service::set_egress_ceiling(cfg.egress_allow_private.clone());
    service.public_url = cfg.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    service.capacity = crate::capacity::Capacity::measure(&cfg.capacity, &cfg.state_dir);
    service.default_rate = cfg.rate_limit;
    service.pools = crate::service::Pools::new(cfg.pools);
    service.default_egress = cfg.default_egress;
    service.default_arch = cfg.default_arch;
    tracing::info!(
        memory_mib = service.capacity.memory_mib,
        vcpus = service.capacity.vcpus,
        disk_reserve_mib = service.capacity.disk_reserve >> 20,
        reclaim_idle = ?service.capacity.reclaim_idle,
        rate = %cfg.rate_limit,
        "host capacity for microvms"
    );
    let svc = service.shared();
    // Named egress connectors before any microvm launches or resumes.
    svc.refresh_connectors().await;
    // Listen at once; what the previous daemon left is settled in the background (its
    // microvms answer ConflictException to changes until then, GetMicrovm their record).
    let live = svc.prepare_recovery().await.map_err(|e| e.to_string())?;
    let recovery = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.recover(live).await })
    };
    let metrics = metrics_listener.map(|l| {
        let router = crate::metrics::router(svc.clone());
        tokio::spawn(async move { axum::serve(l, router).await })
    });
    // The endpoint listener stops with the API's (a watch both can wait on).
    let (stop_endpoints, endpoints_stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_endpoints.send(true);
    };
    let endpoints = endpoint_listener.map(|(l, tls)| {
        let router = router(svc.clone()).layer(axum::Extension(crate::endpoint::ViaTls));
        tokio::spawn(crate::tls::serve(l, tls.config, router, endpoints_stopped))
    });
    started(Started { addr, first_key, metrics_addr, endpoint_addr, ca_file });
    let policy_svc = svc.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let policy = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(cfg.policy_interval) => {}
                _ = stop_rx.changed() => return,
            }
            // A pass runs to its end (a suspend is never cut in half by a shutdown).
            policy_svc.enforce_policies().await;
            // The operator's `hearth connectors` changes reach running microvms here.
            policy_svc.refresh_connectors().await;
        }
    });
    // No Nagle: proxied responses are written as headers, then body chunks as the app sends
    // them; with Nagle on, a client's delayed ACK stalls each small response by ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // hyper's own answers to requests it cannot parse get the service's error form.
    let listener = crate::framing::GuardedListener(listener);
    let app = match cfg.mcp {
        Some(hook) => router(svc.clone()).layer(axum::Extension(crate::mcp_route::McpRoute::new(hook, addr))),
        None => router(svc.clone()),
    };
    let r = axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string());
    let _ = stop_tx.send(true);
    if let Some(e) = endpoints {
        let _ = e.await;
    }
    if let Some(m) = metrics {
        // Scrapes are short and hold nothing: no graceful end needed.
        m.abort();
    }
    let _ = policy.await;
    let _ = recovery.await;
    svc.release_all().await;
    r
}
