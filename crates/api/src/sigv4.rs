//! AWS Signature Version 4 verification of incoming requests (`Authorization:
//! AWS4-HMAC-SHA256 …`), as the AWS SDKs and CLI sign them for the `lambda` signing name.
//!
//! The server side of SigV4 is rebuilding the client's canonical request from what
//! arrived: method, the path URI-encoded once more (the SDKs sign the already-encoded
//! path, encoded again), the query decoded and re-encoded and sorted, exactly the headers
//! the client listed in `SignedHeaders`, and the body's SHA-256. The key derivation and
//! HMAC come from the `aws-sigv4` crate; no crate verifies a request from its parts
//! with the SDKs' encoding rules, so the canonicalization is written here and tested
//! against requests signed by botocore.

use crate::error::{ApiError, Kind};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The signing name clients use for this API.
pub const SERVICE: &str = "lambda";
/// Every signing name the daemon answers: the Lambda MicroVMs API and Hearth's extensions
/// (`lambda`), and the AWS-compatible subsets served at `POST /` ([`crate::aws`]).
pub const SERVICES: [&str; 5] = [SERVICE, "iam", "sts", "secretsmanager", "kms"];
/// How far a request's time may be from ours.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// What a verified request was signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The access key id.
    pub access_key: String,
    /// The region in the credential scope.
    pub region: String,
    /// The body's SHA-256 (hex) the signature covers.
    pub payload_hash: String,
    /// The signing name in the credential scope (one of [`SERVICES`]).
    pub service: String,
}

fn denied(msg: impl Into<String>) -> ApiError {
    ApiError::new(Kind::InvalidSignature, msg)
}

/// `s` URI-encoded as SigV4 wants: unreserved characters kept, `/` kept when `keep_slash`.
fn uri_encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex_sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parses `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !s[..8].bytes().chain(s[9..15].bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<u32>().ok();
    let (y, mo, d, h, mi, se) = (n(0..4)?, n(4..6)?, n(6..8)?, n(9..11)?, n(11..13)?, n(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(y as i64, mo, d) * 86400 + (h * 3600 + mi * 60 + se) as i64;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The parts of an `Authorization` header.
struct Auth<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(h: &str) -> Result<Auth<'_>, ApiError> {
    let rest = h.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(|| denied("only AWS4-HMAC-SHA256 signatures are accepted"))?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',').map(str::trim) {
        match part.split_once('=') {
            Some(("Credential", v)) => cred = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => sig = Some(v),
            _ => return Err(denied(format!("malformed Authorization header part {part:?}"))),
        }
    }
    let cred = cred.ok_or_else(|| denied("Authorization header without Credential"))?;
    let scope: Vec<&str> = cred.split('/').collect();
    let [access_key, date, region, service, "aws4_request"] = scope[..] else {
        return Err(denied("Credential must be KEY/DATE/REGION/SERVICE/aws4_request"));
    };
    let signed_headers: Vec<&str> = signed.ok_or_else(|| denied("Authorization header without SignedHeaders"))?.split(';').collect();
    let signature = sig.ok_or_else(|| denied("Authorization header without Signature"))?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(denied("malformed Signature"));
    }
    Ok(Auth { access_key, date, region, service, signed_headers, signature })
}

/// The path with `.`/`..` segments resolved and empty segments dropped, as the SDKs do
/// before signing (RFC 3986 section 5.2.4, botocore's `remove_dot_segments`).
fn normalize_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let first = if path.starts_with('/') { "/" } else { "" };
    let last = if path.ends_with('/') && !out.is_empty() { "/" } else { "" };
    format!("{first}{}{last}", out.join("/"))
}

/// The canonical URI of the path as it arrived (still percent-encoded): dot segments
/// resolved, then URI-encoded once more, as every AWS SDK signs it for a service other
/// than S3 (botocore's `quote(path, safe='/~')`, aws-sigv4's double encoding): a
/// segment sent as `%66iles` is signed as `%2566iles`, never decoded first.
fn canonical_uri(path: &str) -> String {
    uri_encode(normalize_path(path).as_bytes(), true)
}

/// Why a query's signature may not match although the key is right: SigV4 signs each
/// query name and value URI-encoded (only `A-Za-z0-9-_.~` as they are), whatever the
/// request line carried. The SDKs send the query so encoded; a hand-signed request whose
/// query holds `/`, `:`, `+` or the like as they are (botocore's `SigV4Auth` on a raw URL
/// signs the query as given) does not match, here as on AWS.
fn query_hint(query: Option<&str>) -> &'static str {
    let raw = query.unwrap_or("").bytes().any(|b| !(b.is_ascii_alphanumeric() || b"-_.~%=&".contains(&b)));
    if raw {
        "; note that the query is signed with each name and value URI-encoded (SigV4: '/' as %2F, ':' as %3A, ' ' as %20), \
         so send it encoded as the AWS SDKs do"
    } else {
        ""
    }
}

/// The canonical query string of a raw query.
fn canonical_query(raw: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| percent_encoding::percent_decode_str(&s.replace('+', "%20")).collect::<Vec<u8>>();
            (uri_encode(&dec(k), false), uri_encode(&dec(v), false))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// The SigV4 string to sign: the canonical request (method, path normalized and encoded
/// once more, canonical query, headers, signed header names, payload hash), hashed, under
/// the date and scope. Shared by [`verify`] and [`sign`].
fn string_to_sign(
    method: &http::Method,
    uri: &http::Uri,
    canon_headers: &str,
    signed_headers: &str,
    payload_hash: &str,
    amz_date: &str,
    scope: &str,
) -> String {
    let canonical = format!(
        "{}\n{}\n{}\n{canon_headers}\n{signed_headers}\n{payload_hash}",
        method.as_str(),
        canonical_uri(uri.path()),
        canonical_query(uri.query().unwrap_or("")),
    );
    format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex_sha256(canonical.as_bytes()))
}

/// The access key a request says it is signed with (its Authorization header's
/// credential), so that its secret can be looked up before [`verify`]; `None` when the
/// header is missing or malformed ([`verify`] then says why).
pub fn claimed_access_key(headers: &http::HeaderMap) -> Option<&str> {
    let h = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    parse_authorization(h).ok().map(|a| a.access_key)
}

/// Verifies a request's signature. `secret_of` returns the secret of an access key (None
/// for an unknown key). Returns who signed it.
pub fn verify(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: &[u8],
    now: SystemTime,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<Signed, ApiError> {
    let payload_hash = hex_sha256(body);
    if let Some(claimed) = headers.get("x-amz-content-sha256").and_then(|v| v.to_str().ok()) {
        if claimed != payload_hash {
            return Err(denied("X-Amz-Content-Sha256 does not match the body"));
        }
    }
    verify_hash(method, uri, headers, &payload_hash, now, secret_of)
}

/// Verifies a request whose body's SHA-256 (`payload_hash`, lowercase hex) the caller
/// computed while reading it without keeping it (an oversized body, refused after this).
///
/// # Errors
///
/// As [`verify`].
pub fn verify_payload_hash(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    payload_hash: &str,
    now: SystemTime,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<Signed, ApiError> {
    if let Some(claimed) = headers.get("x-amz-content-sha256").and_then(|v| v.to_str().ok()) {
        if claimed != payload_hash {
            return Err(denied("X-Amz-Content-Sha256 does not match the body"));
        }
    }
    verify_hash(method, uri, headers, payload_hash, now, secret_of)
}

/// Verifies a request whose body has not been read yet (a streamed upload): the signature
/// covers the body's SHA-256 as the `X-Amz-Content-Sha256` header claims it, so the caller
/// authenticates before reading a byte and must compare the hash of what arrives with
/// [`Signed::payload_hash`] afterwards, discarding the body when they differ.
///
/// # Errors
///
/// As [`verify`]; also when the header is missing or not a hex SHA-256 (`UNSIGNED-PAYLOAD`
/// is refused: an upload's bytes must be signed).
pub fn verify_streamed(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    now: SystemTime,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<Signed, ApiError> {
    let claimed = headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .ok_or_else(|| denied("uploads must carry X-Amz-Content-Sha256 with the body's SHA-256 (lowercase hex), signed"))?;
    if !a_signed(headers, "x-amz-content-sha256") {
        return Err(denied("X-Amz-Content-Sha256 must be a signed header on uploads"));
    }
    verify_hash(method, uri, headers, claimed, now, secret_of)
}

/// True when the Authorization header lists `name` among its signed headers.
fn a_signed(headers: &http::HeaderMap, name: &str) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| parse_authorization(a).ok().map(|a| a.signed_headers.contains(&name)))
        .unwrap_or(false)
}

fn verify_hash(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    payload_hash: &str,
    now: SystemTime,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<Signed, ApiError> {
    let authz = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::new(Kind::InvalidSignature, "missing Authorization header: sign requests with SigV4 (an AWS SDK or CLI does)")
        })?
        .to_str()
        .map_err(|_| denied("Authorization header is not text"))?;
    let a = parse_authorization(authz)?;
    if !SERVICES.contains(&a.service) {
        return Err(denied(format!("credential scope names service {:?}; this server signs as one of {SERVICES:?}", a.service)));
    }
    let amz_date = headers.get("x-amz-date").and_then(|v| v.to_str().ok()).ok_or_else(|| denied("missing X-Amz-Date header"))?;
    let when = parse_amz_date(amz_date).ok_or_else(|| denied(format!("malformed X-Amz-Date {amz_date:?}")))?;
    if !amz_date.starts_with(a.date) || a.date.len() != 8 {
        return Err(denied("the credential scope's date is not the request's date"));
    }
    let skew = now.duration_since(when).or_else(|e| Ok::<_, ()>(e.duration())).unwrap_or_default();
    if skew > MAX_SKEW {
        return Err(denied(format!(
            "signature expired or not yet valid: request time {amz_date} is more than 15 minutes from the server's"
        )));
    }
    if !a.signed_headers.contains(&"host") {
        return Err(denied("the Host header must be signed"));
    }
    let secret = secret_of(a.access_key).ok_or_else(|| {
        ApiError::new(Kind::UnrecognizedClient, "the security token included in the request is invalid (unknown access key)")
    })?;

    let mut canon_headers = String::new();
    for name in &a.signed_headers {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(denied("SignedHeaders must be lowercase names"));
        }
        let values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(denied(format!("signed header {name} is missing")));
        }
        canon_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let scope = format!("{}/{}/{}/aws4_request", a.date, a.region, a.service);
    let to_sign = string_to_sign(method, uri, &canon_headers, &a.signed_headers.join(";"), payload_hash, amz_date, &scope);
    let key = aws_sigv4::sign::v4::generate_signing_key(&secret, when, a.region, a.service);
    let expected = aws_sigv4::sign::v4::calculate_signature(key, to_sign.as_bytes());
    // Constant time: every byte is compared whatever the first difference.
    let same = expected.len() == a.signature.len()
        && expected.bytes().zip(a.signature.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y.to_ascii_lowercase())) == 0;
    if !same {
        return Err(denied(format!(
            "the request signature does not match (check the secret access key and signing method){}",
            query_hint(uri.query())
        )));
    }
    Ok(Signed {
        access_key: a.access_key.to_owned(),
        region: a.region.to_owned(),
        payload_hash: payload_hash.to_owned(),
        service: a.service.to_owned(),
    })
}

/// Formats a time as `YYYYMMDDTHHMMSSZ`.
fn amz_date(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss) = crate::clock::civil(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// A request that cannot be signed: a credential or value that no HTTP header can carry.
#[derive(Debug, thiserror::Error)]
#[error("the {what} holds a character a request header cannot carry (a newline, another control character or one outside printable ASCII, often from a file or a paste); remove it and try again")]
pub struct SignError {
    /// What held it: "access key id", "payload hash", "region" or "date".
    pub what: &'static str,
}

fn header(value: &str, what: &'static str) -> Result<http::HeaderValue, SignError> {
    http::HeaderValue::from_str(value).map_err(|_| SignError { what })
}

/// Signs a request as the SDKs do (for Hearth's own clients: the CLI, benchmarks): sets
/// `x-amz-date` and `authorization` in `headers`, which must already hold `host`.
///
/// # Errors
///
/// [`SignError`] when the access key id, region or hash cannot go in a header.
#[allow(clippy::too_many_arguments)] // SigV4's inputs, one by one, as the SDKs name them
pub fn sign(
    method: &http::Method,
    uri: &http::Uri,
    headers: &mut http::HeaderMap,
    body: &[u8],
    access_key: &str,
    secret: &str,
    region: &str,
    now: SystemTime,
) -> Result<(), SignError> {
    sign_for(SERVICE, method, uri, headers, body, access_key, secret, region, now)
}

/// Like [`sign`], for signing name `service` (one of [`SERVICES`]: `iam`, `sts`, …).
///
/// # Errors
///
/// As [`sign`].
#[allow(clippy::too_many_arguments)] // as `sign`
pub fn sign_for(
    service: &str,
    method: &http::Method,
    uri: &http::Uri,
    headers: &mut http::HeaderMap,
    body: &[u8],
    access_key: &str,
    secret: &str,
    region: &str,
    now: SystemTime,
) -> Result<(), SignError> {
    sign_with(service, method, uri, headers, &hex_sha256(body), &["host", "x-amz-date"], access_key, secret, region, now)
}

/// Signs a request whose body is streamed (an upload): as [`sign`], over `payload_hash`
/// (the body's SHA-256, hex), which is also sent and signed as `x-amz-content-sha256`.
///
/// # Errors
///
/// As [`sign`].
#[allow(clippy::too_many_arguments)] // as `sign`
pub fn sign_streamed(
    method: &http::Method,
    uri: &http::Uri,
    headers: &mut http::HeaderMap,
    payload_hash: &str,
    access_key: &str,
    secret: &str,
    region: &str,
    now: SystemTime,
) -> Result<(), SignError> {
    headers.insert("x-amz-content-sha256", header(payload_hash, "payload hash")?);
    sign_with(SERVICE, method, uri, headers, payload_hash, &["host", "x-amz-content-sha256", "x-amz-date"], access_key, secret, region, now)
}

#[allow(clippy::too_many_arguments)] // as `sign`
fn sign_with(
    service: &str,
    method: &http::Method,
    uri: &http::Uri,
    headers: &mut http::HeaderMap,
    payload_hash: &str,
    signed_headers: &[&str],
    access_key: &str,
    secret: &str,
    region: &str,
    now: SystemTime,
) -> Result<(), SignError> {
    let date = amz_date(now);
    headers.insert("x-amz-date", header(&date, "date")?);
    let canon_headers: String = signed_headers
        .iter()
        .map(|n| format!("{n}:{}\n", headers.get(*n).and_then(|v| v.to_str().ok()).unwrap_or_default().trim()))
        .collect();
    let scope = format!("{}/{region}/{service}/aws4_request", &date[..8]);
    let to_sign = string_to_sign(method, uri, &canon_headers, &signed_headers.join(";"), payload_hash, &date, &scope);
    let key = aws_sigv4::sign::v4::generate_signing_key(secret, now, region, service);
    let sig = aws_sigv4::sign::v4::calculate_signature(key, to_sign.as_bytes());
    let auth = format!("AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={}, Signature={sig}", signed_headers.join(";"));
    // The signature is hex and the scope's parts are checked above or fixed: only the
    // access key id and the region can hold what a header cannot.
    header(access_key, "access key id")?;
    header(region, "region")?;
    headers.insert(http::header::AUTHORIZATION, header(&auth, "access key id")?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The vectors were signed by botocore 1.44.8 (`SigV4Auth(Credentials("AKIDHEARTHTEST",
    // SECRET), "lambda", "us-east-1")`); the server's clock is set a minute after each.
    const SECRET: &str = "hearth-test-secret-key-0123456789abcdef";

    fn request(method: &str, uri: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Signed, ApiError> {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let date = headers.iter().find(|(k, _)| *k == "x-amz-date").map_or("20261129T090000Z", |(_, v)| *v);
        let now = parse_amz_date(date).unwrap() + Duration::from_secs(60);
        verify(&method.parse().unwrap(), &uri.parse().unwrap(), &h, body, now, |k| (k == "AKIDHEARTHTEST").then(|| SECRET.to_owned()))
    }

    #[test]
    fn bad_requests_are_refused_with_the_right_error() {
        fn h(auth: &str) -> Vec<(&str, &str)> {
            vec![("host", "h"), ("x-amz-date", "20261129T090000Z"), ("authorization", auth)]
        }
        let good_scope =
            "AWS4-HMAC-SHA256 Credential=AKIDHEARTHTEST/20261129/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=";
        let sig = "0".repeat(64);
        assert_eq!(request("GET", "/", &[("host", "h")], b"").unwrap_err().kind, Kind::InvalidSignature);
        assert_eq!(request("GET", "/", &h(&format!("{good_scope}{sig}")), b"").unwrap_err().kind, Kind::InvalidSignature);
        let unknown = format!(
            "AWS4-HMAC-SHA256 Credential=NOBODY/20261129/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}"
        );
        assert_eq!(request("GET", "/", &h(&unknown), b"").unwrap_err().kind, Kind::UnrecognizedClient);
        let other_service = good_scope.replace("/lambda/", "/s3/");
        assert!(request("GET", "/", &h(&format!("{other_service}{sig}")), b"").unwrap_err().message.contains("service"));
        let no_host = good_scope.replace("host;x-amz-date", "x-amz-date");
        assert!(request("GET", "/", &h(&format!("{no_host}{sig}")), b"").unwrap_err().message.contains("Host"));
        assert!(request("GET", "/", &h("Basic abc"), b"").is_err());
        let auth = format!("{good_scope}{sig}");
        let mut old = h(&auth);
        old[1].1 = "20261129T080000Z";
        assert!(request("GET", "/", &old, b"").is_err());
    }

    #[test]
    fn our_signatures_verify() {
        let now = crate::clock::system();
        let uri: http::Uri = "http://127.0.0.1:1/2017-03-31/tags/arn%3Ax?b=2&a=1".parse().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("host", "127.0.0.1:1".parse().unwrap());
        sign(&http::Method::POST, &uri, &mut h, b"{}", "AKIDHEARTHTEST", SECRET, "us-east-1", now).unwrap();
        let ok = verify(&http::Method::POST, &uri, &h, b"{}", now, |_| Some(SECRET.to_owned())).unwrap();
        assert_eq!(ok.region, "us-east-1");
        assert!(verify(&http::Method::POST, &uri, &h, b"{ }", now, |_| Some(SECRET.to_owned())).is_err());
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(951868800 + 3723)), "20000301T010203Z");
    }

    #[test]
    fn credentials_no_header_can_carry_are_refused_not_panicked_on() {
        let now = crate::clock::system();
        let uri: http::Uri = "http://127.0.0.1:1/".parse().unwrap();
        for (ak, region, what) in
            [("AKID\nX", "us-east-1", "access key id"), ("AKID\u{7f}", "us-east-1", "access key id"), ("AKID", "us\r\n", "region")]
        {
            let mut h = http::HeaderMap::new();
            let e = sign(&http::Method::GET, &uri, &mut h, b"", ak, SECRET, region, now).unwrap_err();
            assert_eq!(e.what, what);
            assert!(e.to_string().contains("newline"), "{e}");
            let e = sign_streamed(&http::Method::PUT, &uri, &mut h, "ab\n", "AKID", SECRET, "us-east-1", now).unwrap_err();
            assert_eq!(e.what, "payload hash");
        }
        // A secret is only hashed: any bytes sign.
        sign(&http::Method::GET, &uri, &mut http::HeaderMap::new(), b"", "AKID", "se\ncret", "us-east-1", now).unwrap();
    }

    #[test]
    fn dates_parse() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(UNIX_EPOCH));
        assert_eq!(parse_amz_date("20000301T000000Z").unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs(), 951868800);
        assert!(parse_amz_date("2000030T000000Z").is_none());
        assert!(parse_amz_date("20001301T000000Z").is_none());
    }

    #[test]
    fn encodings_follow_the_sdks() {
        assert_eq!(uri_encode(b"/2017-03-31/tags/arn%3Aaws", true), "/2017-03-31/tags/arn%253Aaws");
        assert_eq!(canonical_query("nextToken=a%2Bb&maxResults=2"), "maxResults=2&nextToken=a%2Bb");
        assert_eq!(canonical_query("a=b c"), "a=b%20c");
        assert_eq!(normalize_path("/a/b/../c/./d//e/"), "/a/c/d/e/");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path(""), "/");
    }

    #[test]
    fn canonical_uris_encode_the_sent_path_once_more() {
        for (sent, signed) in [
            // A name percent-encoded on the wire: signed as sent, encoded again (not decoded).
            ("/hearth/v1/microvms/mvm-1/%66iles", "/hearth/v1/microvms/mvm-1/%2566iles"),
            ("/hearth/v1/%6dicrovms/mvm-1/%65%78%65%63", "/hearth/v1/%256dicrovms/mvm-1/%2565%2578%2565%2563"),
            ("/hearth/v1/microvms/arn%3Aaws%3Alambda/files", "/hearth/v1/microvms/arn%253Aaws%253Alambda/files"),
            // An encoded slash is a character of its segment, not a separator.
            ("/a/%2F/b", "/a/%252F/b"),
            ("/caf%C3%A9", "/caf%25C3%25A9"),
            // Dot segments and empty segments go before the encoding (encoded dots stay).
            ("/a/./b/../c//d/", "/a/c/d/"),
            ("/a/%2E%2E/b", "/a/%252E%252E/b"),
            ("", "/"),
            ("/", "/"),
        ] {
            assert_eq!(canonical_uri(sent), signed, "{sent}");
        }
        // Characters a request line may carry as they are: encoded once.
        assert_eq!(canonical_uri("/a:b@c!$'()*+,;="), "/a%3Ab%40c%21%24%27%28%29%2A%2B%2C%3B%3D");
        assert_eq!(canonical_query("path=/x&b=a:b"), "b=a%3Ab&path=%2Fx");
        assert_eq!(canonical_query("path=%2Fx"), "path=%2Fx");
        assert!(query_hint(Some("path=/x")).contains("%2F"));
        assert_eq!(query_hint(Some("path=%2Fx&a=b")), "");
        assert_eq!(query_hint(None), "");
    }

    include!("sigv4_vectors.rs");
}
