//! Links a browser can open. A browser cannot set `X-aws-proxy-auth`, so
//! `POST /hearth/v1/microvms/{id}/link` (and `hearth url ID [--port N]`) gives a URL on the
//! microvm's own host carrying a short-lived **link token** ([`LINK_PARAM`], at most
//! [`LINK_SECONDS`]). Opening it, the endpoint answers `303 See Other` to the same path
//! without the token and sets an **HttpOnly cookie** holding an endpoint token of the
//! cookie scope ([`COOKIE_SCOPE`]) for the link's port:
//!
//! - host-only (no `Domain`), `Path=/`, `SameSite=Lax`; on the TLS listener named
//!   `__Host-hearth-auth` and `Secure` (the `__Host-` prefix makes browsers refuse it from
//!   anything but that host over HTTPS), on the plain listener (a TLS proxy in front)
//!   `hearth-auth`;
//! - only ever set on a microvm's own host: the path form (`/microvms/<id>/…`, the
//!   daemon's origin) exchanges no link and reads no cookie, and the API's host never
//!   routes here;
//! - taken out of the `Cookie` header before the request reaches the app, so the app (and
//!   its scripts: HttpOnly) never see it; a link token or a cookie token opens nothing
//!   but this microvm's endpoint at that port (not the shell, not the API);
//! - a link makes one cookie: opened again, it only redirects a browser that already holds
//!   this host's cookie.

use crate::ingress::Claims;
use crate::service::Service;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The query parameter carrying a link token.
pub const LINK_PARAM: &str = "hearth-link";
/// Longest a link token lives: long enough to click, short enough to leak little.
pub const LINK_SECONDS: u64 = 300;
/// The scope of link tokens: the prefix, then the cookie's lifetime in minutes.
pub const LINK_SCOPE_PREFIX: &str = "link:";
/// The scope of the tokens cookies carry.
pub const COOKIE_SCOPE: &str = "cookie";
/// The cookie's name on the TLS listener.
pub const TLS_COOKIE: &str = "__Host-hearth-auth";
/// The cookie's name on the plain listener (a TLS-terminating proxy in front).
pub const PLAIN_COOKIE: &str = "hearth-auth";

/// The link token in a request's query, if any.
pub fn link_token(uri: &http::Uri) -> Option<String> {
    crate::server::query_pairs(uri.query()).into_iter().find(|(k, _)| k == LINK_PARAM).map(|(_, v)| v)
}

fn refused(msg: &str) -> Response {
    crate::error::ApiError::new(crate::error::Kind::AccessDenied, msg).into_response()
}

/// Exchanges the link token of a request for microvm `id`'s host for the cookie: 303 to
/// the same path and query without the token.
pub fn exchange(svc: &Arc<Service>, req: &axum::extract::Request, id: &str) -> Response {
    let Some(token) = link_token(req.uri()) else {
        return refused("missing link token");
    };
    let now = crate::clock::now() as u64;
    let claims = match svc.token_key.verify(&token, now) {
        Ok(c) => c,
        Err(e) => return refused(&format!("{e}: ask for a new link (`hearth url {id}`)")),
    };
    let minutes = claims.k.as_deref().and_then(|k| k.strip_prefix(LINK_SCOPE_PREFIX)).and_then(|m| m.parse::<u64>().ok());
    let Some(minutes) = minutes.filter(|m| (1..=crate::ingress::MAX_TOKEN_MINUTES).contains(m)) else {
        return refused("this token is not a link token");
    };
    if claims.m != id {
        return refused("the link is for another microvm");
    }
    let rest: Vec<String> = crate::server::query_pairs(req.uri().query())
        .into_iter()
        .filter(|(k, _)| k != LINK_PARAM)
        .map(|(k, v)| format!("{}={}", enc(&k), enc(&v)))
        .collect();
    // One leading slash: `//host` (or `/\host`) would send the browser to another site.
    let path = format!("/{}", req.uri().path().trim_start_matches(['/', '\\']));
    let location = if rest.is_empty() { path } else { format!("{path}?{}", rest.join("&")) };
    if !first_use(&token, claims.e) {
        // Used before: a browser that holds this host's cookie (opening the link again)
        // goes on to the page; anyone else needs a new link.
        let mut h = req.headers().clone();
        return match cookie_claims(svc, &mut h, id) {
            Some(Ok(_)) => redirect(&location, None),
            _ => refused("this link was already used: ask for a new one (`hearth url`)"),
        };
    }
    let cookie = Claims { e: now + minutes * 60, k: Some(COOKIE_SCOPE.to_owned()), ..claims };
    let value = svc.token_key.issue(&cookie);
    let tls = req.extensions().get::<crate::endpoint::ViaTls>().is_some();
    let set = if tls {
        format!("{TLS_COOKIE}={value}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax", minutes * 60)
    } else {
        format!("{PLAIN_COOKIE}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax", minutes * 60)
    };
    redirect(&location, Some(&set))
}

/// `303 See Other` to `location`, setting `cookie` if given.
fn redirect(location: &str, cookie: Option<&str>) -> Response {
    let mut r = (http::StatusCode::SEE_OTHER, [("cache-control", "no-store"), ("referrer-policy", "no-referrer")]).into_response();
    if let Ok(l) = http::HeaderValue::from_str(location) {
        r.headers_mut().insert(http::header::LOCATION, l);
    }
    if let Some(c) = cookie.and_then(|c| http::HeaderValue::from_str(c).ok()) {
        r.headers_mut().insert(http::header::SET_COOKIE, c);
    }
    r
}

/// Whether this is the first exchange of link `token` (valid until `expires`): a link
/// makes one cookie. Kept in this process's memory, expired entries dropped on each call
/// (a link lives [`LINK_SECONDS`], and minting is throttled per account, so the set stays
/// small); a daemon restarted within a link's life would accept it once more.
fn first_use(token: &str, expires: u64) -> bool {
    use sha2::Digest;
    static USED: std::sync::Mutex<Option<std::collections::HashMap<[u8; 32], u64>>> = std::sync::Mutex::new(None);
    let now = crate::clock::now() as u64;
    let mut used = USED.lock().unwrap_or_else(|p| p.into_inner());
    let used = used.get_or_insert_with(Default::default);
    used.retain(|_, e| *e > now);
    used.insert(sha2::Sha256::digest(token.as_bytes()).into(), expires).is_none()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The cookie token among `headers`' cookies (either name), and the `Cookie` header with
/// it taken out (None when no other cookie is left).
pub fn take_cookie(headers: &http::HeaderMap) -> (Option<String>, Option<String>) {
    let mut token = None;
    let mut kept = Vec::new();
    for v in headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()) {
        for c in v.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            match c.split_once('=') {
                Some((n, val)) if n == TLS_COOKIE || n == PLAIN_COOKIE => token = Some(val.to_owned()),
                _ => kept.push(c.to_owned()),
            }
        }
    }
    (token, (!kept.is_empty()).then(|| kept.join("; ")))
}

/// On microvm `id`'s own host: takes Hearth's cookie out of the `Cookie` header (always,
/// so the app never sees it) and, when the request carries no `X-aws-proxy-auth` token,
/// checks the cookie's: `None` when there is none (the header token, or its absence, then
/// decides), else its claims or the refusal. A cookie token names its port in
/// `X-aws-proxy-port` when the request names none.
pub fn cookie_claims(svc: &Service, headers: &mut http::HeaderMap, id: &str) -> Option<Result<Claims, Response>> {
    let (token, kept) = take_cookie(headers);
    if token.is_some() {
        headers.remove(http::header::COOKIE);
        if let Some(v) = kept.and_then(|k| http::HeaderValue::from_str(&k).ok()) {
            headers.insert(http::header::COOKIE, v);
        }
    }
    let token = token.filter(|_| !headers.contains_key(crate::ingress::AUTH_HEADER))?;
    let claims = match svc.token_key.verify(&token, crate::clock::now() as u64) {
        Ok(c) => c,
        Err(e) => return Some(Err(refused(&format!("the link's cookie is no longer valid ({e}): open a new link (`hearth url {id}`)")))),
    };
    if claims.m != id || claims.k.as_deref() != Some(COOKIE_SCOPE) {
        return Some(Err(refused("this cookie does not open this microvm")));
    }
    if let (false, [(p, q)]) = (headers.contains_key(crate::ingress::PORT_HEADER), claims.p.as_slice()) {
        if p == q {
            headers.insert(crate::ingress::PORT_HEADER, http::HeaderValue::from(*p));
        }
    }
    Some(Ok(claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_and_others_kept() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; __Host-hearth-auth=tok.en; b=2".parse().unwrap());
        assert_eq!(take_cookie(&h), (Some("tok.en".into()), Some("a=1; b=2".into())));
        h.insert(http::header::COOKIE, "hearth-auth=t".parse().unwrap());
        assert_eq!(take_cookie(&h), (Some("t".into()), None));
        h.insert(http::header::COOKIE, "session=1; hearth-auth-x=2".parse().unwrap());
        assert_eq!(take_cookie(&h), (None, Some("session=1; hearth-auth-x=2".into())));
    }

    #[test]
    fn cookies_open_only_their_microvm_and_leave_the_app_none() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::ingress::TokenKey::load_or_create(dir.path()).unwrap();
        let svc = Service::new(
            crate::store::Store::open(&dir.path().join("db")).unwrap(),
            dir.path().into(),
            dir.path().into(),
            hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs"),
            key,
        );
        let c = |m: &str, k: Option<&str>| {
            let claims = Claims { a: "111111111111".into(), m: m.into(), e: u64::MAX / 2, p: vec![(9000, 9000)], k: k.map(str::to_owned) };
            svc.token_key.issue(&claims)
        };
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, format!("x=1; hearth-auth={}", c("mvm-a", Some(COOKIE_SCOPE))).parse().unwrap());
        let claims = cookie_claims(&svc, &mut h, "mvm-a").unwrap().unwrap_or_else(|_| panic!("refused"));
        assert_eq!(claims.m, "mvm-a");
        assert_eq!(h[http::header::COOKIE], "x=1", "the app never sees Hearth's cookie");
        assert_eq!(h[crate::ingress::PORT_HEADER], "9000", "the link's port");
        for (token, on) in [(c("mvm-a", Some(COOKIE_SCOPE)), "mvm-b"), (c("mvm-a", None), "mvm-a"), (c("mvm-a", Some("shell")), "mvm-a")] {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::COOKIE, format!("__Host-hearth-auth={token}").parse().unwrap());
            assert!(cookie_claims(&svc, &mut h, on).unwrap().is_err(), "another microvm's cookie, or an endpoint/shell token as a cookie");
            assert!(!h.contains_key(http::header::COOKIE));
        }
        // A header token decides; the cookie is still taken out.
        let mut h = http::HeaderMap::new();
        h.insert(crate::ingress::AUTH_HEADER, "hdr".parse().unwrap());
        h.insert(http::header::COOKIE, "hearth-auth=t; y=2".parse().unwrap());
        assert!(cookie_claims(&svc, &mut h, "mvm-a").is_none());
        assert_eq!(h[http::header::COOKIE], "y=2");
    }

    #[test]
    fn a_link_makes_one_cookie_and_redirects_only_to_its_own_host() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::ingress::TokenKey::load_or_create(dir.path()).unwrap();
        let vm = hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs");
        let svc = Arc::new(Service::new(
            crate::store::Store::open(&dir.path().join("db")).unwrap(),
            dir.path().into(),
            dir.path().into(),
            vm,
            key,
        ));
        let claims = Claims {
            a: "111111111111".into(),
            m: "mvm-a".into(),
            e: u64::MAX / 2,
            p: vec![(8080, 8080)],
            k: Some(format!("{LINK_SCOPE_PREFIX}5")),
        };
        let token = svc.token_key.issue(&claims);
        let get = |uri: String, cookie: Option<&str>| {
            let mut b = http::Request::get(uri);
            if let Some(c) = cookie {
                b = b.header(http::header::COOKIE, c);
            }
            exchange(&svc, &b.body(axum::body::Body::empty()).unwrap(), "mvm-a")
        };
        let r = get(format!("//evil.example/x?a=1&{LINK_PARAM}={token}"), None);
        assert_eq!(r.status(), http::StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[http::header::LOCATION], "/evil.example/x?a=1", "one path on this host");
        let set = r.headers()[http::header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(set.starts_with(&format!("{PLAIN_COOKIE}=")) && set.contains("HttpOnly"), "{set}");
        // Again: refused without the cookie; with it, on to the page with no new cookie.
        assert_eq!(get(format!("/?{LINK_PARAM}={token}"), None).status(), http::StatusCode::FORBIDDEN);
        let cookie = set.split(';').next().unwrap();
        let r = get(format!("/?{LINK_PARAM}={token}"), Some(cookie));
        assert_eq!(r.status(), http::StatusCode::SEE_OTHER);
        assert!(!r.headers().contains_key(http::header::SET_COOKIE));
        // Another microvm's link on this host, and an endpoint token as a link: refused.
        let theirs = svc.token_key.issue(&Claims { m: "mvm-b".into(), ..claims.clone() });
        assert_eq!(get(format!("/?{LINK_PARAM}={theirs}"), None).status(), http::StatusCode::FORBIDDEN);
        let endpoint = svc.token_key.issue(&Claims { k: None, ..claims });
        assert_eq!(get(format!("/?{LINK_PARAM}={endpoint}"), None).status(), http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn link_tokens_are_found_in_the_query() {
        let u: http::Uri = "/app?x=1&hearth-link=abc.def".parse().unwrap();
        assert_eq!(link_token(&u).as_deref(), Some("abc.def"));
        assert!(link_token(&"/".parse().unwrap()).is_none());
    }
}
