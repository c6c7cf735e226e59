//! Hearth's extensions over HTTP (`/hearth/v1/…`, SigV4-signed and authorized by
//! [`crate::server`] before they get here): exec, files and archives, links, forks,
//! egress, connectors, usage, MCP tokens; and their OpenAPI description ([`openapi`]).

use crate::error::{ApiError, Kind};
use crate::server::{json_response, query_pairs};
use crate::service::{egress_from, ExecLine, Service};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_proto::exec::ExecRequest;
use serde_json::{json, Value};
use std::sync::Arc;

/// The segments of an extension's path (after `/hearth/v1/`), each percent-decoded: the
/// one split both routing and authorization ([`crate::auth::extension_action`]) use.
pub fn segments(rest: &str) -> Vec<String> {
    rest.split('/').map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()).collect()
}

pub(crate) async fn extension(
    svc: &Arc<Service>,
    account: &str,
    method: &http::Method,
    rest: &str,
    query: Option<&str>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let q = query_pairs(query);
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let decoded = segments(rest);
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["microvms", id, "exec"]) => {
            let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("exec body is not JSON: {e}")))?;
            let mut req = exec_request(&v)?;
            // The image's WORKDIR, ENV and USER apply unless the call says otherwise.
            svc.apply_image_config(account, id, &mut req).await;
            let stdin = v.get("stdin").and_then(Value::as_str).map(|s| Bytes::from(s.to_owned()));
            if param("stream").as_deref() == Some("true") {
                return stream_exec(svc.clone(), account.to_owned(), id.to_string(), req, stdin).await;
            }
            let out = svc.exec(account, id, req, stdin).await?;
            Ok(json_response(
                200,
                &json!({ "exitCode": out.exit.code, "signal": out.exit.signal, "stdout": out.stdout_str(), "stderr": out.stderr_str() }),
            ))
        }
        ("GET", ["microvms", id, "files"]) => {
            let path = param("path").ok_or_else(|| ApiError::validation("missing ?path="))?;
            let d = svc.read_file(account, id, path).await?;
            Ok(download(d, "application/octet-stream"))
        }
        ("GET", ["microvms", id, "files", "archive"]) => {
            let path = param("path").ok_or_else(|| ApiError::validation("missing ?path="))?;
            let d = svc.read_archive(account, id, path).await?;
            Ok(download(d, "application/x-tar"))
        }
        ("PUT", ["microvms", id, "files"]) => {
            let path = param("path").ok_or_else(|| ApiError::validation("missing ?path="))?;
            // A body signed without X-Amz-Content-Sha256 (streamed writes carry it: crate::files).
            let size = Some(body.len() as u64);
            let info = svc.write_file(account, id, path, size, futures_util::stream::iter([Ok(body)])).await??;
            Ok(json_response(200, &json!({ "size": info.size })))
        }
        ("PUT", ["microvms", id, "files", "archive"]) => {
            let path = param("path").ok_or_else(|| ApiError::validation("missing ?path="))?;
            let size = body.len() as u64;
            let stats = svc.write_archive(account, id, path, Some(size), futures_util::stream::iter([Ok(body)])).await??;
            Ok(json_response(200, &json!({ "size": size, "entries": stats.entries, "bytes": stats.bytes })))
        }
        ("GET", ["microvms", id, "files", "list"]) => {
            let path = param("path").unwrap_or_else(|| "/".into());
            let entries = svc.list_dir(account, id, path).await?;
            Ok(json_response(200, &json!({ "entries": serde_json::to_value(entries).map_err(ApiError::internal)? })))
        }
        // Authorized as lambda:ForkMicrovm on the source's ARN before `extension` runs (crate::auth::extension_action).
        ("POST", ["microvms", id, "fork"]) => Ok(json_response(200, &svc.fork_request(account, id, &body).await?)),
        ("POST", ["microvms", id, "link"]) => {
            let v: Value = if body.is_empty() {
                json!({})
            } else {
                serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("link body is not JSON: {e}")))?
            };
            let num = |k: &str, default: u64| match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(n) => n.as_u64().ok_or_else(|| ApiError::validation(format!("{k} must be a whole number"))),
            };
            let port = u16::try_from(num("port", u64::from(crate::ingress::DEFAULT_PORT))?)
                .map_err(|_| ApiError::validation("port must be 1-65535"))?;
            Ok(json_response(200, &svc.link(account, id, port, num("expirationInMinutes", 60)?).await?))
        }
        ("PUT", ["microvms", id, "egress"]) => {
            let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("egress body is not JSON: {e}")))?;
            let egress = svc.set_egress(account, id, egress_from(&v)?).await?;
            Ok(json_response(200, &json!({ "egress": egress })))
        }
        ("GET", ["microvms", id, "egress"]) => {
            let e = svc.egress(account, id).await?;
            Ok(json_response(200, &json!({ "egress": e })))
        }
        ("GET", ["egress-connectors"]) => Ok(json_response(200, &svc.list_connectors(account).await?)),
        ("PUT", ["egress-connectors", name]) => {
            let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("connector body is not JSON: {e}")))?;
            Ok(json_response(200, &svc.put_connector(account, name, &v).await?))
        }
        ("GET", ["egress-connectors", name]) => Ok(json_response(200, &svc.get_connector(account, name).await?)),
        ("DELETE", ["egress-connectors", name]) => {
            svc.delete_connector(account, name).await?;
            Ok(json_response(200, &json!({})))
        }
        ("GET", ["usage"]) => {
            let num = |k: &str| {
                param(k)
                    .map(|v| v.parse::<f64>().map_err(|_| ApiError::validation(format!("{k} must be seconds since the epoch"))))
                    .transpose()
            };
            let (from, to, u) = svc.usage(account, num("from")?.unwrap_or(0.0), num("to")?).await?;
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
    let rx = svc.exec_stream(account, id, req, stdin).await?;
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = match rx.recv().await? {
            ExecLine::Stdout(b) => json!({ "stdout": String::from_utf8_lossy(&b) }),
            ExecLine::Stderr(b) => json!({ "stderr": String::from_utf8_lossy(&b) }),
            ExecLine::Exit(x) => json!({ "exit": { "code": x.code, "signal": x.signal } }),
            ExecLine::Error(e) => json!({ "error": e }),
        };
        Some((Ok::<_, std::io::Error>(Bytes::from(format!("{line}\n"))), rx))
    });
    Ok(([("content-type", "application/x-ndjson")], axum::body::Body::from_stream(body)).into_response())
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
                "get": { "summary": "Read a file (?path=), streamed at any size, with Content-Length; a directory is a 400 (read it as an archive), a missing path a 404", "responses": { "200": { "description": "the bytes" } } },
                "put": { "summary": "Write a file atomically (?path=), body = bytes: streamed at any size up to the microvm's free disk when X-Amz-Content-Sha256 is signed (a body that does not match it is not kept; UNSIGNED-PAYLOAD is refused), else at most 1 MiB; a full disk is a 413", "responses": { "200": { "description": "size" } } } },
            "/hearth/v1/microvms/{microvmId}/files/archive": {
                "get": { "summary": "Read a directory's contents (?path=) as a tar archive (files, directories, symbolic links kept as links), streamed", "responses": { "200": { "description": "application/x-tar" } } },
                "put": { "summary": "Unpack a tar archive into a new directory (?path=; 409 when it exists), atomically; signed and streamed as file writes are. Entries must be relative, without '..', not through links; files, directories and symbolic links only; owners are not kept", "responses": { "200": { "description": "size, entries, bytes" } } } },
            "/hearth/v1/microvms/{microvmId}/files/list": { "get": { "summary": "List a directory (?path=)", "responses": { "200": { "description": "entries" } } } },
            "/hearth/v1/microvms/{microvmId}/fork": { "post": {
                "summary": "Fork a RUNNING microvm: a new microvm of the same account, image, version and settings, admitted by quotas and host capacity like RunMicrovm, with RAM, device state and disk copied at one instant; its own id, endpoint, network and identity, a fresh clock, kernel RNG, hostname and machine-id. The source keeps running (its vCPUs pause for the copy; execs in flight finish first).",
                "requestBody": { "content": { "application/json": { "schema": { "type": "object", "properties": { "clientToken": { "type": "string", "description": "1-64 characters; a retry with the same token answers the same fork" } } } } } },
                "responses": { "200": { "description": "the fork, as GetMicrovm answers it: {microvmId, state: RUNNING, endpoint, imageArn, imageVersion, …}" }, "409": { "description": "the source is not RUNNING, or still busy" } } } },
            "/hearth/v1/microvms/{microvmId}/link": { "post": {
                "summary": "A link a browser can open: the endpoint's URL with a short-lived link token (5 min) that the endpoint exchanges for an HttpOnly cookie of the microvm's own host",
                "requestBody": { "content": { "application/json": { "schema": { "type": "object", "properties": {
                    "port": { "type": "integer", "minimum": 1, "maximum": 65535, "default": 8080 },
                    "expirationInMinutes": { "type": "integer", "minimum": 1, "maximum": 1440, "default": 60, "description": "how long the cookie lasts" } } } } } },
                "responses": { "200": { "description": "{url, port, linkExpiresAt, cookieMinutes}" } } } },
            "/hearth/v1/egress-connectors": {
                "get": { "summary": "The egress connectors the account may name: its own, then the operator's", "responses": { "200": { "description": "{connectors: [connector]}" } } } },
            "/hearth/v1/egress-connectors/{name}": {
                "put": { "summary": "Create or replace a named egress connector: {allowCidrs: [CIDR[:PORT[-PORT]][/tcp|/udp]], allowDomains: [example.com, *.example.org]}; microvms name it by its connectorArn in egressNetworkConnectors, and running ones follow a change at once", "responses": { "200": { "description": "{connectorArn, name, owner, allowCidrs, allowDomains, createdAt, updatedAt}" } } },
                "get": { "summary": "One connector (the account's, else the operator's of that name)", "responses": { "200": { "description": "connector" } } },
                "delete": { "summary": "Delete a connector no live microvm names", "responses": { "200": { "description": "{}" } } } },
            "/hearth/v1/microvms/{microvmId}/egress": {
                "get": { "summary": "The microvm's egress policy", "responses": { "200": { "description": "{egress}" } } },
                "put": { "summary": "Replace the egress policy while it runs: {internet: bool, allow: [rule], deny: [rule]}, rules CIDR[:PORT[-PORT]][/tcp|/udp]; kept across suspend/resume", "responses": { "200": { "description": "{egress}" } } } },
            "/hearth/v1/artifacts": { "post": {
                "summary": "Upload a code artifact (a zip with a Dockerfile at its root, streamed, at most 1 GiB). Sign X-Amz-Content-Sha256 with the body's SHA-256; name the result in CreateMicrovmImage's codeArtifact.uri. Kept 24 hours.",
                "requestBody": { "content": { "application/zip": { "schema": { "type": "string", "format": "binary" } } } },
                "responses": { "201": { "description": "{uri: \"hearth://artifacts/<sha256>\", sha256, size}" } } } },
            "/hearth/v1/mcp-tokens": { "post": { "summary": "Mint a bearer token for the daemon's MCP server at /mcp (scope: that server only; acts with the signing access key; refused to role sessions): {expirationInMinutes: 1-1440, default 60}", "responses": { "200": { "description": "{token, url, expiresAt}" }, "403": { "description": "a role session's credentials" } } } },
            "/hearth/v1/usage": { "get": { "summary": "Metered usage of the caller's account between ?from= and ?to= (seconds since the epoch): vCPU-seconds and GiB-seconds while RUNNING, snapshot GiB-hours while SUSPENDED", "responses": { "200": { "description": "usage" } } } }
        }
    })
}

/// A download's answer: its chunks as they come, with `Content-Length` when the size is
/// known (so a transfer cut short is an error to the client, not a shorter file).
fn download(d: crate::service::Download, content_type: &'static str) -> Response {
    let chunks = futures_util::stream::unfold(d.chunks, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut resp = ([("content-type", content_type)], axum::body::Body::from_stream(chunks)).into_response();
    if let Some(n) = d.size {
        resp.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
    }
    resp
}
