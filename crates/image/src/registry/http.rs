//! The registry's HTTP side (the distribution API's manifest and blob GETs, its token
//! flow), spoken by Hearth's own `reqwest` client rather than `oci-client`'s: that one
//! reads whole manifests, token replies and error bodies into memory (a hostile registry
//! could send gigabytes), and it opens its connections (redirects, the token service a
//! registry names, proxies from the environment) where nothing can check them.
//!
//! Here every reply is read with a cap ([`MAX_MANIFEST_BYTES`], [`MAX_TOKEN_BYTES`],
//! [`MAX_ERROR_BYTES`]; blobs stream to a file, at most their declared size, their digest
//! checked), and a tenant's pull uses a client under the artifact download's guard
//! ([`crate::artifact::guarded`]: names resolved to public addresses only, each redirect
//! checked, no proxy), run from a network namespace of its own (see `pull.rs`). A reply
//! body is quoted in errors only from registries the operator configured.

use super::{quote_remote, PullError};
use reqwest::header::{ACCEPT, WWW_AUTHENTICATE};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Most bytes of a manifest or an index.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most bytes of a token service's reply.
pub const MAX_TOKEN_BYTES: usize = 1 << 20;
/// Most bytes of an error reply read (and only from an operator's registry).
pub const MAX_ERROR_BYTES: usize = 16 << 10;
/// How long connecting to a registry may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a registry may leave a response without a byte.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The manifest types asked for: OCI and Docker, images and multi-platform indexes.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// What the pull is about, for its errors.
pub(super) struct Ctx {
    pub reference: String,
    pub registry: String,
    pub via: String,
    /// The operator configured this registry (or runs the build): its replies may be quoted.
    pub trusted: bool,
}

impl Ctx {
    pub(super) fn invalid(&self, reason: impl Into<String>) -> PullError {
        PullError::Invalid { reference: self.reference.clone(), reason: reason.into() }
    }

    pub(super) fn host(&self, what: &str) -> impl FnOnce(std::io::Error) -> PullError + '_ {
        let what = what.to_owned();
        move |e| PullError::Host { reference: self.reference.clone(), what, source: Box::new(e) }
    }

    fn denied(&self, detail: impl Into<String>) -> PullError {
        PullError::Unauthorized { reference: self.reference.clone(), registry: self.registry.clone(), detail: detail.into() }
    }

    /// A transport error: a refusal by the guard, or the registry unreachable.
    pub(super) fn transport(&self, e: &reqwest::Error) -> PullError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(r) = c.downcast_ref::<crate::artifact::Refusal>() {
                return PullError::Refused { reference: self.reference.clone(), target: r.host.clone() };
            }
            cause = c.source();
        }
        PullError::Unreachable {
            reference: self.reference.clone(),
            registry: self.registry.clone(),
            via: self.via.clone(),
            detail: chain(e),
        }
    }

    /// A reply that is not a success, as an error a user can act on.
    async fn status(&self, resp: reqwest::Response) -> PullError {
        let code = resp.status().as_u16();
        let detail = match self.trusted {
            true => read_capped(resp, MAX_ERROR_BYTES).await.ok().and_then(|b| envelope(&b)),
            false => None,
        };
        let detail = detail.map_or_else(|| format!("HTTP {code}"), |d| format!("HTTP {code}: {d}"));
        match code {
            404 => PullError::NotFound { reference: self.reference.clone(), registry: self.registry.clone(), detail },
            401 | 403 => self.denied(detail),
            _ => self.invalid(format!("the registry {} answered {detail}", self.registry)),
        }
    }
}

/// The messages of a distribution error reply (`{"errors":[{"code":…,"message":…}]}`).
fn envelope(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct Env {
        errors: Vec<E>,
    }
    let env: Env = serde_json::from_slice(body).ok()?;
    let text = env.errors.iter().map(|e| if e.message.is_empty() { e.code.as_str() } else { e.message.as_str() }).collect::<Vec<_>>();
    (!text.is_empty()).then(|| quote_remote(&text.join("; ")))
}

/// An error and its causes, one line (reqwest's own message hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.dedup();
    quote_remote(&parts.join(": "))
}

/// Reads `resp`'s body, failing as soon as it passes `cap` bytes.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, Result<reqwest::Error, usize>> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(Err(cap));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Ok)? {
        if out.len() + chunk.len() > cap {
            return Err(Err(cap));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// `sha256:<hex>` of `bytes`.
pub(super) fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// How requests are authorised, once the registry asked.
#[derive(Clone)]
enum Auth {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

/// One repository of one registry.
pub(super) struct Registry {
    client: reqwest::Client,
    /// `scheme://host[:port]`.
    base: String,
    repo: String,
    creds: Option<(String, String)>,
    auth: Auth,
    /// A tenant's registry: the guard, for the URLs this code opens itself (the token
    /// service's; its client checks names and redirects).
    guard: Option<std::sync::Arc<crate::artifact::Guard>>,
}

impl Registry {
    /// The repository `repo` at `scheme://host` with `creds` (the operator's), through
    /// `client` (built under `guard` for a tenant's registry).
    pub(super) fn new(
        client: reqwest::Client,
        scheme: &str,
        host: &str,
        repo: &str,
        creds: Option<(String, String)>,
        guard: Option<std::sync::Arc<crate::artifact::Guard>>,
    ) -> Registry {
        Registry { client, base: format!("{scheme}://{host}"), repo: repo.to_owned(), creds, auth: Auth::Anonymous, guard }
    }

    /// GETs `url`; on a first 401, follows the registry's challenge (a bearer token from
    /// its token service, or HTTP basic with the operator's credentials) and tries again.
    async fn get(&mut self, ctx: &Ctx, url: &str, accept: Option<&str>) -> Result<reqwest::Response, PullError> {
        let send = |auth: &Auth| {
            let mut rq = self.client.get(url);
            if let Some(a) = accept {
                rq = rq.header(ACCEPT, a);
            }
            match auth {
                Auth::Anonymous => rq,
                Auth::Basic(u, p) => rq.basic_auth(u, Some(p)),
                Auth::Bearer(t) => rq.bearer_auth(t),
            }
            .send()
        };
        let resp = send(&self.auth).await.map_err(|e| ctx.transport(&e))?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED || !matches!(self.auth, Auth::Anonymous) {
            return Ok(resp);
        }
        self.auth = self.authenticate(ctx, &resp).await?;
        send(&self.auth).await.map_err(|e| ctx.transport(&e))
    }

    /// The authorisation the 401 `resp` asks for.
    async fn authenticate(&self, ctx: &Ctx, resp: &reqwest::Response) -> Result<Auth, PullError> {
        let header = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let mut basic = false;
        for c in http_auth::parser::ChallengeParser::new(header).flatten() {
            if c.scheme.eq_ignore_ascii_case("basic") {
                basic = true;
            }
            if !c.scheme.eq_ignore_ascii_case("bearer") {
                continue;
            }
            let param = |name: &str| c.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_unescaped());
            let Some(realm) = param("realm") else { continue };
            return self.token(ctx, &realm, param("service")).await.map(Auth::Bearer);
        }
        match &self.creds {
            Some((u, p)) if basic => Ok(Auth::Basic(u.clone(), p.clone())),
            _ => Err(ctx.denied("HTTP 401")),
        }
    }

    /// A pull token from the token service at `realm` (any URL the registry names: for a
    /// tenant's pull, under the same guard as the registry itself).
    async fn token(&self, ctx: &Ctx, realm: &str, service: Option<String>) -> Result<String, PullError> {
        let refused = || ctx.denied("its token service refused the request");
        let mut url = reqwest::Url::parse(realm).map_err(|_| refused())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused());
        }
        // An IP literal meets no resolver: checked here, as a redirect's is.
        if let Some(Err(r)) = self.guard.as_ref().map(|g| g.check(&url)) {
            return Err(PullError::Refused { reference: ctx.reference.clone(), target: r.host });
        }
        url.query_pairs_mut().append_pair("scope", &format!("repository:{}:pull", self.repo));
        if let Some(s) = service {
            url.query_pairs_mut().append_pair("service", &s);
        }
        let mut rq = self.client.get(url);
        if let Some((u, p)) = &self.creds {
            rq = rq.basic_auth(u, Some(p));
        }
        let resp = rq.send().await.map_err(|e| ctx.transport(&e))?;
        // Not quoted: what a token service answers is no business of the tenant's.
        if !resp.status().is_success() {
            return Err(refused());
        }
        #[derive(serde::Deserialize)]
        struct Token {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let body = read_capped(resp, MAX_TOKEN_BYTES).await.map_err(|e| match e {
            Ok(e) => ctx.transport(&e),
            Err(cap) => ctx.invalid(format!("the registry's token service sent over {cap} bytes")),
        })?;
        let t: Token = serde_json::from_slice(&body).map_err(|_| ctx.invalid("the registry's token service sent no token"))?;
        let token = if t.token.is_empty() { t.access_token } else { t.token };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ctx.invalid("the registry's token service sent no usable token"));
        }
        Ok(token)
    }

    /// The manifest (or index) `reference` (a tag or a digest) names, at most
    /// [`MAX_MANIFEST_BYTES`], and its digest (checked against `reference` when that is one).
    pub(super) async fn manifest(&mut self, ctx: &Ctx, reference: &str) -> Result<(Vec<u8>, String), PullError> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repo);
        let resp = self.get(ctx, &url, Some(MANIFEST_TYPES)).await?;
        if !resp.status().is_success() {
            return Err(ctx.status(resp).await);
        }
        let body = read_capped(resp, MAX_MANIFEST_BYTES).await.map_err(|e| match e {
            Ok(e) => ctx.transport(&e),
            Err(cap) => ctx.invalid(format!("the registry sent a manifest of over {cap} bytes")),
        })?;
        let digest = sha256(&body);
        if reference.starts_with("sha256:") && !reference.eq_ignore_ascii_case(&digest) {
            return Err(ctx.invalid("the registry sent a manifest that does not match its digest"));
        }
        Ok((body, digest))
    }

    /// Streams the blob `digest` into `out`: exactly `size` bytes whose digest matches.
    pub(super) async fn blob(
        &mut self,
        ctx: &Ctx,
        digest: &str,
        size: u64,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), PullError> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repo);
        let mut resp = self.get(ctx, &url, None).await?;
        if !resp.status().is_success() {
            return Err(ctx.status(resp).await);
        }
        if resp.content_length().is_some_and(|n| n > size) {
            return Err(ctx.invalid("the registry sent more bytes than the manifest declares"));
        }
        let (mut hash, mut got) = (Sha256::new(), 0u64);
        while let Some(chunk) = resp.chunk().await.map_err(|e| ctx.transport(&e))? {
            got += chunk.len() as u64;
            if got > size {
                return Err(ctx.invalid("the registry sent more bytes than the manifest declares"));
            }
            hash.update(&chunk);
            out.write_all(&chunk).await.map_err(ctx.host("write a layer file"))?;
        }
        if got != size {
            return Err(ctx.invalid("the registry sent fewer bytes than the manifest declares"));
        }
        let found = format!("sha256:{}", hash.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>());
        if !digest.eq_ignore_ascii_case(&found) {
            return Err(ctx.invalid("the registry sent content that does not match its digest"));
        }
        out.flush().await.map_err(ctx.host("write a layer file"))
    }
}

#[cfg(test)]
mod tests;
