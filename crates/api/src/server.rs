//! The HTTP side: every request is read (bounded), authenticated with SigV4, routed by
//! the model, validated, made idempotent where the model has a `clientToken`, and answered
//! with the model's status codes and error shapes. Hearth's own extensions live under
//! `/hearth/v1/` (same authentication; described by `/hearth/v1/openapi.json`); `/health`
//! needs none; `/metrics` is served apart, on the operator's listener
//! ([`ServeConfig::metrics_listen`], [`crate::metrics::router`]), and here is refused like
//! any unsigned request. Microvm endpoints (`/microvms/<id>/…`, [`crate::ingress`]) and
//! shells (`/shell/<id>`, [`crate::shell`]) are authenticated by their tokens instead.

use crate::error::{ApiError, Kind};
use crate::model::{model, MAX_BODY};
use crate::service::{unknown_operation, Service};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_proto::binpath::BinPath;
use hearth_proto::exec::ExecRequest;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The router.
pub fn router(svc: Arc<Service>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(svc)
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
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

fn json_response(status: u16, v: &Value) -> Response {
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if status == http::StatusCode::NO_CONTENT {
        return status.into_response();
    }
    (status, [("content-type", "application/json")], v.to_string()).into_response()
}

async fn handle(State(svc): State<Arc<Service>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    match (parts.method.as_str(), path.as_str()) {
        ("GET", "/health") => return (http::StatusCode::OK, "ok\n").into_response(),
        ("GET", "/hearth/v1/openapi.json") => return json_response(200, &openapi()),
        _ => {}
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
    // Microvm endpoints: token-authenticated, proxied to the app.
    if let Some(rest) = path.strip_prefix("/microvms/") {
        let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let (id, rest) = (id.to_owned(), rest.to_owned());
        let req = Request::from_parts(parts, body);
        return crate::ingress::proxy(svc, req, id, rest).await;
    }
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return ApiError::validation(format!("the request body is over {MAX_BODY} bytes")).into_response(),
    };
    let signed = crate::sigv4::verify(&parts.method, &parts.uri, &parts.headers, &bytes, SystemTime::now(), |k| {
        svc.store.key(k).ok().flatten().map(|k| k.secret)
    });
    let account = match signed.and_then(|s| {
        svc.store.key(&s.access_key).ok().flatten().ok_or_else(|| ApiError::new(Kind::UnrecognizedClient, "unknown access key"))
    }) {
        Ok(k) => k.account,
        Err(e) => {
            svc.metrics.request("auth", e.status());
            return e.into_response();
        }
    };
    if let Some(rest) = path.strip_prefix("/hearth/v1/") {
        return match extension(&svc, &account, &parts.method, rest, parts.uri.query(), bytes).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let (op, params) = match model().route(&parts.method, &path) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let input = model().parse_input(op, &params, &query_pairs(parts.uri.query()), &bytes)?;
        let token = input.get("clientToken").and_then(Value::as_str).map(str::to_owned);
        let hash = {
            let mut without = input.clone();
            without.remove("clientToken");
            format!("{:x}", Sha256::digest(Value::Object(without).to_string()))
        };
        if let Some(t) = &token {
            // Claimed before the call runs, so two concurrent retries cannot both run it.
            if let Some((h, resp)) = svc.store.claim(&account, &op.name, t, &hash).map_err(ApiError::internal)? {
                if h != hash {
                    return Err(ApiError::conflict(&op.name, t, "clientToken was already used with different parameters"));
                }
                if resp.is_empty() {
                    return Err(ApiError::conflict(&op.name, t, "a call with this clientToken is still in progress; retry shortly"));
                }
                return serde_json::from_str(&resp).map_err(ApiError::internal);
            }
        }
        let out = dispatch(&svc, &account, &op.name, &input).await;
        if let Some(t) = &token {
            match &out {
                Ok(v) => svc.store.remember(&account, &op.name, t, &hash, &v.to_string()).map_err(ApiError::internal)?,
                Err(_) => svc.store.unclaim(&account, &op.name, t).map_err(ApiError::internal)?,
            }
        }
        out
    }
    .await;
    let status = result.as_ref().map_or_else(ApiError::status, |_| op.status);
    svc.metrics.request(&op.name, status);
    tracing::info!(operation = %op.name, %account, status, ms = started.elapsed().as_secs_f64() * 1000.0, "api call");
    match result {
        Ok(v) => json_response(op.status, &v),
        Err(e) => e.into_response(),
    }
}

async fn dispatch(svc: &Arc<Service>, account: &str, op: &str, input: &Map<String, Value>) -> Result<Value, ApiError> {
    let ident = input.get("microvmIdentifier").and_then(Value::as_str).unwrap_or_default();
    match op {
        "RunMicrovm" => svc.run_microvm(account, input).await,
        "GetMicrovm" => svc.get_microvm(account, input).await,
        "ListMicrovms" => svc.list_microvms(account, input).await,
        "SuspendMicrovm" => svc.suspend_microvm(account, ident, None).await,
        "ResumeMicrovm" => svc.resume_microvm(account, ident).await,
        "TerminateMicrovm" => svc.terminate_microvm(account, ident, None).await,
        "CreateMicrovmImage" => svc.create_image(account, input, false).await,
        "UpdateMicrovmImage" => svc.create_image(account, input, true).await,
        "GetMicrovmImage" => svc.get_image(account, input),
        "ListMicrovmImages" => svc.list_images(account, input),
        "DeleteMicrovmImage" => svc.delete_image(account, input),
        "GetMicrovmImageVersion" => svc.get_version(account, input),
        "ListMicrovmImageVersions" => svc.list_versions(account, input),
        "UpdateMicrovmImageVersion" => svc.update_version(account, input),
        "DeleteMicrovmImageVersion" => svc.delete_version(account, input),
        "GetMicrovmImageBuild" => svc.get_build(account, input),
        "ListMicrovmImageBuilds" => svc.list_builds(account, input),
        "ListManagedMicrovmImages" => svc.list_managed(input),
        "ListManagedMicrovmImageVersions" => svc.list_managed_versions(input),
        "CreateMicrovmAuthToken" => svc.auth_token(account, input),
        "ListTags" => svc.list_tags(account, input),
        "TagResource" => svc.tag(account, input),
        "UntagResource" => svc.untag(account, input),
        "CreateMicrovmShellAuthToken" => svc.shell_token(account, input),
        other => Err(unknown_operation(other)),
    }
}

/// Most bytes of output an API exec returns per stream.
const MAX_EXEC_OUTPUT: usize = 8 << 20;

async fn extension(
    svc: &Arc<Service>,
    account: &str,
    method: &http::Method,
    rest: &str,
    query: Option<&str>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let q = query_pairs(query);
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let decoded: Vec<String> = rest.split('/').map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()).collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["microvms", id, "exec"]) => {
            let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("exec body is not JSON: {e}")))?;
            let mut req = exec_request(&v)?;
            // The image's WORKDIR, ENV and USER apply unless the call says otherwise.
            svc.apply_image_config(account, id, &mut req);
            let stdin = v.get("stdin").and_then(Value::as_str).map(|s| Bytes::from(s.to_owned()));
            if param("stream").as_deref() == Some("true") {
                return stream_exec(svc.clone(), account.to_owned(), id.to_string(), req, stdin).await;
            }
            let out = svc
                .with_vm(account, id, move |vm| {
                    Box::pin(async move {
                        vm.exec(&req, stdin, MAX_EXEC_OUTPUT).await.map_err(|e| match e {
                            hearth_vmm::VmError::Agent(a) => file_err(a),
                            other => ApiError::internal(format!("exec: {other}")),
                        })
                    })
                })
                .await?;
            Ok(json_response(
                200,
                &json!({ "exitCode": out.exit.code, "signal": out.exit.signal, "stdout": out.stdout_str(), "stderr": out.stderr_str() }),
            ))
        }
        ("GET", ["microvms", id, "files"]) => {
            let path = param("path").ok_or_else(|| ApiError::validation("missing ?path="))?;
            let data = svc
                .with_vm(account, id, move |vm| {
                    Box::pin(async move { vm.agent().read_file_bytes(&BinPath::from(path.as_str()), 256 << 20).await.map_err(file_err) })
                })
                .await?;
            Ok(([("content-type", "application/octet-stream")], data).into_response())
        }
        ("PUT", ["microvms", id, "files"]) => {
            let path = param("path").ok_or_else(|| ApiError::validation("missing ?path="))?;
            let info = svc
                .with_vm(account, id, move |vm| {
                    Box::pin(async move { vm.agent().write_file_bytes(&BinPath::from(path.as_str()), None, body).await.map_err(file_err) })
                })
                .await?;
            Ok(json_response(200, &json!({ "size": info.size })))
        }
        ("GET", ["microvms", id, "files", "list"]) => {
            let path = param("path").unwrap_or_else(|| "/".into());
            let entries = svc
                .with_vm(account, id, move |vm| {
                    Box::pin(async move { vm.agent().list(&BinPath::from(path.as_str())).await.map_err(file_err) })
                })
                .await?;
            Ok(json_response(200, &json!({ "entries": serde_json::to_value(entries).map_err(ApiError::internal)? })))
        }
        ("PUT", ["microvms", id, "egress"]) => {
            let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("egress body is not JSON: {e}")))?;
            let egress = egress_from(&v)?;
            let recorded = serde_json::to_value(&egress).map_err(ApiError::internal)?;
            let e2 = egress.clone();
            svc.with_vm(account, id, move |vm| {
                Box::pin(async move {
                    vm.set_egress(&e2).map_err(|e| match e {
                        hearth_vmm::VmError::Network(n) => ApiError::validation(n.to_string()),
                        other => ApiError::internal(other),
                    })
                })
            })
            .await?;
            svc.record_egress(account, id, recorded.clone())?;
            Ok(json_response(200, &json!({ "egress": recorded })))
        }
        ("GET", ["microvms", id, "egress"]) => {
            let e = svc.with_vm(account, id, |vm| Box::pin(async move { Ok(vm.egress()) })).await?;
            Ok(json_response(200, &json!({ "egress": e })))
        }
        ("GET", ["usage"]) => {
            let num = |k: &str, d: f64| {
                param(k)
                    .map(|v| v.parse::<f64>().map_err(|_| ApiError::validation(format!("{k} must be seconds since the epoch"))))
                    .transpose()
                    .map(|x| x.unwrap_or(d))
            };
            let now = crate::service::now();
            let (from, to) = (num("from", 0.0)?, num("to", now)?);
            let u = svc.store.usage(account, from, to, now).map_err(ApiError::internal)?;
            Ok(json_response(200, &json!({ "account": account, "from": from, "to": to, "usage": u })))
        }
        _ => Err(ApiError::new(
            Kind::UnknownOperation,
            format!("no Hearth extension at {method} /hearth/v1/{rest} (see /hearth/v1/openapi.json)"),
        )),
    }
}

/// `exec?stream=true`: the command's output as it comes, one JSON object per line
/// (`{"stdout": "…"}`, `{"stderr": "…"}`, finally `{"exit": {"code": …, "signal": …}}`
/// or `{"error": "…"}`), over a chunked response.
async fn stream_exec(svc: Arc<Service>, account: String, id: String, req: ExecRequest, stdin: Option<Bytes>) -> Result<Response, ApiError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, ApiError>>(32);
    tokio::spawn(async move {
        let lines = tx.clone();
        let r = svc
            .with_vm(&account, &id, move |vm| {
                Box::pin(async move {
                    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
                    let mut s = vm.exec_stream(&req).await.map_err(|e| match e {
                        hearth_vmm::VmError::Agent(a) => file_err(a),
                        other => ApiError::internal(format!("exec: {other}")),
                    })?;
                    // The stream has started: from here on, errors are lines of the body.
                    let _ = lines.send(Ok(Bytes::new())).await;
                    if let Some(data) = stdin {
                        if let Err(e) = s.write_stdin(data).await {
                            let _ = lines.send(line(json!({ "error": format!("stdin: {e}") }))).await;
                        }
                    }
                    s.close_stdin();
                    loop {
                        let msg = match s.next_event().await {
                            Ok(Some(hearth_vmm::agent::ExecEvent::Stdout(b))) => json!({ "stdout": String::from_utf8_lossy(&b) }),
                            Ok(Some(hearth_vmm::agent::ExecEvent::Stderr(b))) => json!({ "stderr": String::from_utf8_lossy(&b) }),
                            Ok(Some(hearth_vmm::agent::ExecEvent::Exit(x))) => json!({ "exit": { "code": x.code, "signal": x.signal } }),
                            Ok(None) => json!({ "error": "the exec ended without a status" }),
                            Err(e) => json!({ "error": e.to_string() }),
                        };
                        let last = msg.get("stdout").is_none() && msg.get("stderr").is_none();
                        // A client that went away, or stopped reading for a minute, ends it
                        // (and lets go of the VM).
                        match tokio::time::timeout(Duration::from_secs(60), lines.send(line(msg))).await {
                            Ok(Ok(())) => {}
                            _ => return Ok(()),
                        }
                        if last {
                            return Ok(());
                        }
                    }
                })
            })
            .await;
        if let Err(e) = r {
            let _ = tx.send(Err(e)).await;
        }
    });
    match rx.recv().await {
        Some(Ok(_)) => {}
        Some(Err(e)) => return Err(e),
        None => return Err(ApiError::internal("the exec stream ended before it started")),
    }
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map_err(|e| std::io::Error::other(e.to_string())), rx))
    });
    Ok(([("content-type", "application/x-ndjson")], axum::body::Body::from_stream(body)).into_response())
}

/// `{"internet": bool, "allow": [RULE…], "deny": [RULE…]}` with `CIDR[:PORT[-PORT]][/tcp|/udp]` rules,
/// refused when an allow rule reaches further than the host's ceiling (the operator's
/// `--egress-allow-private`; nothing before `serve` sets it).
fn egress_from(v: &Value) -> Result<hearth_vmm::net::Egress, ApiError> {
    let rules = |k: &str| -> Result<Vec<hearth_vmm::net::Rule>, ApiError> {
        v.get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|r| {
                let s = r.as_str().ok_or_else(|| ApiError::validation(format!("{k} rules must be strings")))?;
                hearth_vmm::net::Rule::parse(s).map_err(|e| ApiError::validation(e.to_string()))
            })
            .collect()
    };
    if let Some(k) = v.as_object().and_then(|o| o.keys().find(|k| !["internet", "allow", "deny"].contains(&k.as_str()))) {
        return Err(ApiError::validation(format!("unknown egress field {k:?} (internet, allow, deny)")));
    }
    let egress = hearth_vmm::net::Egress {
        internet: v.get("internet").and_then(Value::as_bool).unwrap_or(false),
        allow: rules("allow")?,
        deny: rules("deny")?,
    };
    egress.within(&hearth_vmm::net::host_ceiling().unwrap_or_default()).map_err(|e| ApiError::validation(e.to_string()))?;
    Ok(egress)
}

fn file_err(e: hearth_vmm::AgentError) -> ApiError {
    match e {
        hearth_vmm::AgentError::Remote(b) if b.code == hearth_proto::ErrorCode::NotFound => ApiError::new(Kind::NotFound, b.message),
        hearth_vmm::AgentError::Remote(b) => ApiError::validation(b.message),
        other => ApiError::internal(other),
    }
}

fn exec_request(v: &Value) -> Result<ExecRequest, ApiError> {
    let mut r = match (v.get("command"), v.get("shell")) {
        (Some(Value::Array(a)), None) if !a.is_empty() => {
            let argv: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(str::to_owned)).collect();
            ExecRequest::argv(argv.ok_or_else(|| ApiError::validation("command must be a list of strings"))?)
        }
        (None, Some(Value::String(s))) => ExecRequest::shell(s.clone()),
        _ => return Err(ApiError::validation("give either \"command\": [argv…] or \"shell\": \"…\"")),
    };
    if let Some(env) = v.get("env").and_then(Value::as_object) {
        for (k, x) in env {
            r.env.insert(k.clone(), x.as_str().ok_or_else(|| ApiError::validation("env values must be strings"))?.to_owned());
        }
    }
    r.cwd = v.get("cwd").and_then(Value::as_str).map(str::to_owned);
    r.user = v.get("user").and_then(Value::as_str).map(str::to_owned);
    r.timeout_ms = v.get("timeoutSeconds").and_then(Value::as_f64).map(|s| (s * 1000.0) as u64);
    r.stdin = v.get("stdin").is_some();
    Ok(r)
}

/// The OpenAPI document of Hearth's extensions.
pub fn openapi() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": { "title": "Hearth extensions to the Lambda MicroVMs API", "version": "1" },
        "components": { "securitySchemes": { "sigv4": { "type": "apiKey", "name": "Authorization", "in": "header", "description": "AWS SigV4, signing name `lambda`" } } },
        "security": [{ "sigv4": [] }],
        "paths": {
            "/hearth/v1/microvms/{microvmId}/exec": { "post": {
                "summary": "Run a command to completion (resumes a SUSPENDED microvm when its idle policy allows; counts as activity)",
                "requestBody": { "content": { "application/json": { "schema": { "type": "object", "properties": {
                    "command": { "type": "array", "items": { "type": "string" } }, "shell": { "type": "string" },
                    "env": { "type": "object", "additionalProperties": { "type": "string" } }, "cwd": { "type": "string" },
                    "user": { "type": "string" }, "timeoutSeconds": { "type": "number" }, "stdin": { "type": "string" } } } } } },
                "parameters": [{ "name": "stream", "in": "query", "schema": { "type": "boolean" }, "description": "stream the output as NDJSON lines ({stdout}, {stderr}, then {exit} or {error}) over a chunked response" }],
                "responses": { "200": { "description": "exitCode, signal, stdout, stderr (UTF-8, lossy; at most 8 MiB each), or with ?stream=true the NDJSON lines" } } } },
            "/hearth/v1/microvms/{microvmId}/files": {
                "get": { "summary": "Read a file (?path=)", "responses": { "200": { "description": "the bytes" } } },
                "put": { "summary": "Write a file atomically (?path=), body = bytes", "responses": { "200": { "description": "size" } } } },
            "/hearth/v1/microvms/{microvmId}/files/list": { "get": { "summary": "List a directory (?path=)", "responses": { "200": { "description": "entries" } } } },
            "/hearth/v1/microvms/{microvmId}/egress": {
                "get": { "summary": "The microvm's egress policy", "responses": { "200": { "description": "{egress}" } } },
                "put": { "summary": "Replace the egress policy while it runs: {internet: bool, allow: [rule], deny: [rule]}, rules CIDR[:PORT[-PORT]][/tcp|/udp]; kept across suspend/resume", "responses": { "200": { "description": "{egress}" } } } },
            "/hearth/v1/artifacts": { "post": {
                "summary": "Upload a code artifact (a zip with a Dockerfile at its root, streamed, at most 1 GiB). Sign X-Amz-Content-Sha256 with the body's SHA-256; name the result in CreateMicrovmImage's codeArtifact.uri. Kept 24 hours.",
                "requestBody": { "content": { "application/zip": { "schema": { "type": "string", "format": "binary" } } } },
                "responses": { "201": { "description": "{uri: \"hearth://artifacts/<sha256>\", sha256, size}" } } } },
            "/hearth/v1/usage": { "get": { "summary": "Metered usage of the caller's account between ?from= and ?to= (seconds since the epoch): vCPU-seconds and GiB-seconds while RUNNING, snapshot GiB-hours while SUSPENDED", "responses": { "200": { "description": "usage" } } } }
        }
    })
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
    /// The URL clients reach the daemon at (microvm endpoints are under it); default
    /// `http://<listen address>`.
    pub public_url: Option<String>,
    /// Where `GET /metrics` is served, apart from the API (its counts and latencies are
    /// the operator's, not the tenants'); none serves no metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Destinations in the closed ranges (private, CGNAT, link-local, loopback, multicast,
    /// reserved) the operator opens to every microvm of the host: the host's egress ceiling.
    /// Tenants' allow rules may reach into them, never further; empty opens none.
    pub egress_allow_private: Vec<hearth_vmm::net::Rule>,
}

/// What `serve` reports once it listens.
pub struct Started {
    /// The bound address.
    pub addr: std::net::SocketAddr,
    /// The access key created on first start (printed once).
    pub first_key: Option<crate::store::AccessKey>,
    /// The bound metrics address, when metrics are served.
    pub metrics_addr: Option<std::net::SocketAddr>,
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
    let first_key = if !store.has_keys().map_err(|e| e.to_string())? {
        let k = crate::keys::new_key(&crate::keys::new_account());
        store.add_key(&k).map_err(|e| e.to_string())?;
        Some(k)
    } else {
        None
    };
    let token_key = crate::ingress::TokenKey::load_or_create(&dir).map_err(|e| format!("token key: {e}"))?;
    raise_fd_limit();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| format!("listen on {a} for metrics: {e}"))?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose().map_err(|e| e.to_string())?;
    // Before any VM is restored or started: every namespace of this process is under it.
    hearth_vmm::net::set_host_ceiling(Some(hearth_vmm::net::Ceiling { allow: cfg.egress_allow_private.clone() }));
    let mut service = Service::new(store, cfg.home.clone(), cfg.state_dir.clone(), cfg.vm, token_key);
    service.public_url = cfg.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let svc = Arc::new(service);
    svc.reconcile().await.map_err(|e| e.to_string())?;
    // Detached VMs nobody reattached (a crash between their start and their record) are
    // killed; then run directories whose QEMU is gone go.
    hearth_vmm::vm::kill_unowned_detached(&svc.vm_template.run_root);
    hearth_vmm::vm::sweep_stale_run_dirs(&svc.vm_template.run_root);
    let metrics = metrics_listener.map(|l| {
        let router = crate::metrics::router(svc.clone());
        tokio::spawn(async move { axum::serve(l, router).await })
    });
    started(Started { addr, first_key, metrics_addr });
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
        }
    });
    // No Nagle: proxied responses are written as headers, then body chunks as the app sends
    // them; with Nagle on, a client's delayed ACK stalls each small response by ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let r = axum::serve(listener, router(svc.clone())).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string());
    let _ = stop_tx.send(true);
    if let Some(m) = metrics {
        // Scrapes are short and hold nothing: no graceful end needed.
        m.abort();
    }
    let _ = policy.await;
    svc.release_all().await;
    r
}

#[cfg(test)]
mod egress_tests {
    use super::*;
    use hearth_vmm::net::{set_host_ceiling, Ceiling, Rule};

    /// One test, since the host ceiling is process-wide.
    #[test]
    fn tenant_egress_rules_only_narrow_the_host_ceiling() {
        set_host_ceiling(Some(Ceiling::default()));
        let e = egress_from(&json!({ "internet": true, "allow": ["10.0.0.0/8:5432/tcp"] })).unwrap_err();
        assert_eq!((e.kind.name(), e.kind.status()), ("ValidationException", 400));
        assert!(e.message.contains("10.0.0.0/8:5432/tcp") && e.message.contains("--egress-allow-private"), "{}", e.message);
        for wide in ["0.0.0.0/0", "169.254.169.254", "100.64.0.0/10:80", "127.0.0.1:22/tcp"] {
            assert!(egress_from(&json!({ "allow": [wide] })).is_err(), "{wide}");
        }
        // Public destinations, deny rules and internet egress are the tenant's to set.
        egress_from(&json!({ "internet": true, "allow": ["93.184.0.0/16:53/udp"], "deny": ["10.0.0.0/8", "0.0.0.0/0"] })).unwrap();
        set_host_ceiling(Some(Ceiling { allow: vec![Rule::parse("10.1.0.0/16").unwrap()] }));
        egress_from(&json!({ "allow": ["10.1.2.0/24:5432/tcp"] })).unwrap();
        assert!(egress_from(&json!({ "allow": ["10.2.0.0/16"] })).is_err());
        set_host_ceiling(None);
    }
}
