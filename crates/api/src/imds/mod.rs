//! The instance metadata service of microvms (IMDSv2), as EC2 serves it at
//! `http://169.254.169.254`, so the AWS SDKs' default credential chain inside a microvm
//! finds its execution role's temporary credentials.
//!
//! The guest's agent listens on `169.254.169.254:80` on its loopback interface and hands
//! each connection to the host over the agent channel ([`relay`]); the daemon serves it
//! with HTTP/1.1 here. The microvm is known from the channel the connection came over,
//! never from anything the guest sends. Requests under `/latest/` are the metadata
//! service ([`route`]); anything else is the daemon's API as if it came over the network
//! (SigV4 verified as usual: the guest's SDKs reach Secrets Manager, KMS, STS and IAM at
//! this address through `AWS_ENDPOINT_URL_*`), except the forms authenticated by tokens
//! (microvm endpoints and shells), which a guest cannot reach this way ([`pass_through`]).
//!
//! Tokens (`PUT /latest/api/token`) are random, live up to 6 hours, are kept per running
//! VM (at most [`MAX_TOKENS`]) and die with it (a suspend, like an EC2 stop, ends them);
//! every `GET` needs one (IMDSv1 is refused with 401, as on an instance that requires
//! IMDSv2). Credentials are issued on demand, when the guest asks, for the role the
//! microvm's record names now ([`Service::issue_session`], session name
//! `hearth-<microvm id>`), reused until a quarter hour before they expire; a suspended
//! microvm's files therefore hold only what its guest fetched.
//!
//! Image builds' builder VMs are served alike ([`relay::Build`]): the version's
//! `buildRoleArn`, 15-minute sessions issued to the build id, all revoked before the
//! template snapshot and at the build's end, so what a template's RAM holds is dead.

pub mod relay;

pub use relay::{Build, Relay};

use crate::service::{SessionCredentials, REGION};
use http::{HeaderMap, Method, StatusCode};
use std::collections::HashMap;

/// Live tokens kept per VM; the oldest goes first past it.
pub const MAX_TOKENS: usize = 64;
/// The longest token lifetime (6 hours), as EC2.
pub const MAX_TOKEN_TTL: u64 = 21_600;
/// How long credentials live when the microvm's lifetime allows it.
pub const CREDENTIALS_TTL: u64 = 3_600;
/// Credentials are renewed when they have less than this left (or half their life).
pub const REFRESH_BEFORE: f64 = 900.0;
/// The availability zone the metadata names (the SDKs derive the region from it).
pub const AVAILABILITY_ZONE: &str = "hh-local-1a";

/// The token header of every request.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The TTL header of a token request (and of its answer).
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// A microvm's live tokens.
#[derive(Default)]
pub struct Tokens {
    /// Token → expiry (seconds since the epoch).
    live: HashMap<String, f64>,
}

impl Tokens {
    /// Keeps a new token until `expiry`, dropping expired ones and, past [`MAX_TOKENS`],
    /// the one expiring first.
    pub fn insert(&mut self, token: String, expiry: f64, now: f64) {
        self.live.retain(|_, e| *e > now);
        while self.live.len() >= MAX_TOKENS {
            let Some(first) = self.live.iter().min_by(|a, b| a.1.total_cmp(b.1)).map(|(t, _)| t.clone()) else { break };
            self.live.remove(&first);
        }
        self.live.insert(token, expiry);
    }

    /// Whether `token` is live at `now`.
    pub fn valid(&self, token: &str, now: f64) -> bool {
        self.live.get(token).is_some_and(|e| *e > now)
    }
}

/// What a metadata request asks for, once its method, path and token are checked.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// A new token living `ttl` seconds.
    Token(u64),
    /// A refusal: status and plain-text body.
    Refuse(StatusCode, &'static str),
    /// A fixed text answer.
    Text(String),
    /// The role name listing (`iam/security-credentials/`).
    RoleName,
    /// The role's credentials, by the role name the path gives.
    Credentials(String),
    /// `iam/info`.
    IamInfo,
    /// The instance identity document.
    Identity,
}

/// Routes a metadata request (`path` under `/latest/`) of microvm `microvm`.
pub fn route(method: &Method, path: &str, headers: &HeaderMap, tokens: &Tokens, now: f64, microvm: &str) -> Route {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if path == "/latest/api/token" {
        if method != Method::PUT {
            return Route::Refuse(StatusCode::METHOD_NOT_ALLOWED, "use PUT for a token");
        }
        // As EC2: a token request that went through a proxy is refused.
        if headers.contains_key("x-forwarded-for") {
            return Route::Refuse(StatusCode::FORBIDDEN, "Forbidden");
        }
        return match header(TTL_HEADER).and_then(|t| t.trim().parse::<u64>().ok()) {
            Some(ttl) if (1..=MAX_TOKEN_TTL).contains(&ttl) => Route::Token(ttl),
            _ => Route::Refuse(StatusCode::BAD_REQUEST, "X-aws-ec2-metadata-token-ttl-seconds must be 1-21600"),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return Route::Refuse(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    // IMDSv2 only: every read carries a live token.
    if !header(TOKEN_HEADER).is_some_and(|t| tokens.valid(t, now)) {
        return Route::Refuse(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let p = path.strip_prefix("/latest").unwrap_or(path);
    let trimmed = p.trim_end_matches('/');
    match trimmed {
        "" => Route::Text("dynamic\nmeta-data\n".into()),
        "/meta-data" => Route::Text("iam/\ninstance-id\nplacement/\n".into()),
        "/meta-data/instance-id" => Route::Text(microvm.to_owned()),
        "/meta-data/placement" => Route::Text("availability-zone\nregion\n".into()),
        "/meta-data/placement/region" => Route::Text(REGION.into()),
        "/meta-data/placement/availability-zone" => Route::Text(AVAILABILITY_ZONE.into()),
        "/meta-data/iam" => Route::Text("info\nsecurity-credentials/\n".into()),
        "/meta-data/iam/info" => Route::IamInfo,
        "/meta-data/iam/security-credentials" => Route::RoleName,
        "/dynamic" => Route::Text("instance-identity/\n".into()),
        "/dynamic/instance-identity" => Route::Text("document\n".into()),
        "/dynamic/instance-identity/document" => Route::Identity,
        other => match other.strip_prefix("/meta-data/iam/security-credentials/") {
            Some(name) if !name.is_empty() && !name.contains('/') => Route::Credentials(name.to_owned()),
            _ => Route::Refuse(StatusCode::NOT_FOUND, "Not Found"),
        },
    }
}

/// The role's name in its ARN (`arn:aws:iam::<account>:role/<path/>name`).
pub fn role_name(role_arn: &str) -> &str {
    role_arn.rsplit('/').next().unwrap_or(role_arn)
}

/// The credentials document the SDKs read.
pub fn credentials_json(c: &SessionCredentials, issued: f64) -> serde_json::Value {
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": rfc3339(issued),
        "Type": "AWS-HMAC",
        "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key,
        "Token": c.session_token,
        "Expiration": rfc3339(c.expiration),
    })
}

/// The instance identity document (`accountId`, `region`, … as the SDKs read them).
pub fn identity_json(account: &str, microvm: &str, started_at: f64, arch: &str) -> serde_json::Value {
    serde_json::json!({
        "accountId": account,
        "architecture": arch,
        "availabilityZone": AVAILABILITY_ZONE,
        "imageId": null,
        "instanceId": microvm,
        "instanceType": "microvm",
        "pendingTime": rfc3339(started_at),
        "privateIp": null,
        "region": REGION,
        "version": "2017-09-30",
    })
}

/// How long credentials issued at `now` live for a microvm whose lifetime ends at `end`:
/// [`CREDENTIALS_TTL`], less when the microvm ends sooner (never under a minute).
pub fn credentials_ttl(now: f64, end: f64) -> u64 {
    let left = (end - now).ceil();
    if left.is_finite() && left < CREDENTIALS_TTL as f64 {
        (left.max(60.0)) as u64
    } else {
        CREDENTIALS_TTL
    }
}

/// Whether credentials issued at `issued`, expiring at `expiration`, are due for renewal.
pub fn needs_refresh(issued: f64, expiration: f64, now: f64) -> bool {
    let margin = REFRESH_BEFORE.min((expiration - issued) / 2.0);
    now >= expiration - margin
}

/// `2026-01-02T03:04:05Z` of seconds since the epoch.
pub fn rfc3339(secs: f64) -> String {
    crate::clock::iso8601(secs)
}

/// Whether a request that is not the metadata service may go on to the daemon's API: it
/// must name the metadata address as its host (so the endpoint-by-host routing can never
/// take it to a microvm), and not be one of the token-authenticated forms (a microvm's
/// endpoint by path, a shell). `Err` says why not.
pub fn pass_through(headers: &HeaderMap, path: &str) -> Result<(), &'static str> {
    let host = headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !matches!(host, "169.254.169.254" | "169.254.169.254:80") {
        return Err("requests through the metadata address must name it as their Host");
    }
    if path.starts_with("/microvms/") || path.starts_with("/shell/") {
        return Err("microvm endpoints and shells are not reachable through the metadata address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_need_put_a_valid_ttl_and_no_proxy() {
        let t = Tokens::default();
        let r = |m: Method, h: &[(&'static str, &str)]| route(&m, "/latest/api/token", &headers(h), &t, 0.0, "mvm-1");
        assert_eq!(r(Method::PUT, &[(TTL_HEADER, "21600")]), Route::Token(21600));
        assert_eq!(r(Method::PUT, &[(TTL_HEADER, "1")]), Route::Token(1));
        for bad in ["0", "21601", "-5", "x", ""] {
            assert!(matches!(r(Method::PUT, &[(TTL_HEADER, bad)]), Route::Refuse(StatusCode::BAD_REQUEST, _)), "{bad}");
        }
        assert!(matches!(r(Method::PUT, &[]), Route::Refuse(StatusCode::BAD_REQUEST, _)));
        assert!(matches!(r(Method::GET, &[(TTL_HEADER, "60")]), Route::Refuse(StatusCode::METHOD_NOT_ALLOWED, _)));
        let proxied = r(Method::PUT, &[(TTL_HEADER, "60"), ("x-forwarded-for", "10.0.0.1")]);
        assert!(matches!(proxied, Route::Refuse(StatusCode::FORBIDDEN, _)));
    }

    #[test]
    fn reads_need_a_live_token_imdsv1_is_refused() {
        let mut t = Tokens::default();
        t.insert("good".into(), 100.0, 0.0);
        let get = |h: &[(&'static str, &str)], now: f64| {
            route(&Method::GET, "/latest/meta-data/iam/security-credentials/", &headers(h), &t, now, "mvm-1")
        };
        assert_eq!(get(&[(TOKEN_HEADER, "good")], 50.0), Route::RoleName);
        assert!(matches!(get(&[], 50.0), Route::Refuse(StatusCode::UNAUTHORIZED, _)), "IMDSv1");
        assert!(matches!(get(&[(TOKEN_HEADER, "forged")], 50.0), Route::Refuse(StatusCode::UNAUTHORIZED, _)));
        assert!(matches!(get(&[(TOKEN_HEADER, "good")], 100.0), Route::Refuse(StatusCode::UNAUTHORIZED, _)), "expired");
        let post = route(&Method::POST, "/latest/meta-data/", &headers(&[(TOKEN_HEADER, "good")]), &t, 1.0, "m");
        assert!(matches!(post, Route::Refuse(StatusCode::METHOD_NOT_ALLOWED, _)));
    }

    #[test]
    fn paths_as_the_sdks_read_them() {
        let mut t = Tokens::default();
        t.insert("k".into(), 10.0, 0.0);
        let h = headers(&[(TOKEN_HEADER, "k")]);
        let get = |p: &str| route(&Method::GET, p, &h, &t, 1.0, "mvm-abc");
        assert_eq!(get("/latest/meta-data/iam/security-credentials"), Route::RoleName);
        assert_eq!(get("/latest/meta-data/iam/security-credentials/app"), Route::Credentials("app".into()));
        assert_eq!(get("/latest/meta-data/iam/security-credentials/app/"), Route::Credentials("app".into()));
        assert_eq!(get("/latest/meta-data/placement/region"), Route::Text("hh-local-1".into()));
        // botocore derives the region from the zone, less its last letter.
        assert_eq!(get("/latest/meta-data/placement/availability-zone/"), Route::Text("hh-local-1a".into()));
        assert_eq!(get("/latest/meta-data/instance-id"), Route::Text("mvm-abc".into()));
        assert_eq!(get("/latest/dynamic/instance-identity/document"), Route::Identity);
        for missing in ["/latest/meta-data/nope", "/latest/meta-data/iam/security-credentials/a/b", "/latest/x"] {
            assert!(matches!(get(missing), Route::Refuse(StatusCode::NOT_FOUND, _)), "{missing}");
        }
    }

    #[test]
    fn tokens_are_bounded_and_expire() {
        let mut t = Tokens::default();
        for i in 0..(MAX_TOKENS + 10) {
            t.insert(format!("t{i}"), 1000.0 + i as f64, 0.0);
        }
        assert_eq!(t.live.len(), MAX_TOKENS);
        assert!(!t.valid("t0", 1.0), "the first to expire went first");
        assert!(t.valid(&format!("t{}", MAX_TOKENS + 9), 1.0));
        t.insert("late".into(), 5000.0, 4000.0);
        assert!(t.live.len() < MAX_TOKENS, "expired ones are dropped");
    }

    #[test]
    fn credentials_shape_ttl_and_refresh() {
        let c = SessionCredentials {
            access_key_id: "HSIAX".into(),
            secret_access_key: "s".into(),
            session_token: "tok".into(),
            expiration: 1_767_225_600.0 + 3600.0,
        };
        let j = credentials_json(&c, 1_767_225_600.0);
        assert_eq!(j["Code"], "Success");
        assert_eq!(j["Type"], "AWS-HMAC");
        assert_eq!(j["LastUpdated"], "2026-01-01T00:00:00Z");
        assert_eq!(j["Expiration"], "2026-01-01T01:00:00Z");
        assert_eq!(j["Token"], "tok");
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(credentials_ttl(0.0, 100_000.0), CREDENTIALS_TTL);
        assert_eq!(credentials_ttl(0.0, 1200.5), 1201);
        assert_eq!(credentials_ttl(0.0, 10.0), 60);
        assert!(!needs_refresh(0.0, 3600.0, 2000.0));
        assert!(needs_refresh(0.0, 3600.0, 2700.0));
        assert!(needs_refresh(0.0, 120.0, 60.0), "short ones at half their life");
        assert_eq!(role_name("arn:aws:iam::123456789012:role/team/app"), "app");
        let id = identity_json("123456789012", "mvm-1", 0.0, "x86_64");
        assert_eq!(id["accountId"], "123456789012");
        assert_eq!(id["region"], "hh-local-1");
    }

    #[test]
    fn only_the_api_passes_through() {
        let ok = headers(&[("host", "169.254.169.254")]);
        assert!(pass_through(&ok, "/").is_ok());
        assert!(pass_through(&headers(&[("host", "169.254.169.254:80")]), "/2025-09-09/microvms").is_ok());
        // Another microvm's endpoint by host, or by path, or a shell: refused.
        assert!(pass_through(&headers(&[("host", "mvm-0123456789abcdef.microvms.localhost")]), "/").is_err());
        assert!(pass_through(&headers(&[]), "/").is_err());
        assert!(pass_through(&ok, "/microvms/mvm-1/").is_err());
        assert!(pass_through(&ok, "/shell/mvm-1").is_err());
    }
}
