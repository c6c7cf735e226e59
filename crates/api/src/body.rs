//! A signed request's body as the API reads it: at most [`MAX_BODY`] bytes kept, its
//! framing checked, its media type the protocol's.
//!
//! An oversized body is refused with 413 *after* authentication, as clients expect and
//! without telling an unsigned caller anything about a key: the body is read on, hashed
//! and not kept, up to [`MAX_HASHED`] bytes, and the signature checked over its hash (the
//! whole body read, the client then reads the answer rather than a reset). A body past
//! that is refused there: authenticated over the hash it claims (`X-Amz-Content-Sha256`,
//! signed) when it claims one, else with 413 unauthenticated, the same answer whatever
//! the key, so it tells nothing.
//!
//! The model's protocol is rest-json: a body is `application/json` (parameters such as
//! `charset` allowed), a bodiless request may carry no media type at all; anything else is
//! answered 415 UnsupportedMediaTypeException, as the Smithy rest-json protocol tests
//! (`RestJsonWithBodyExpectsApplicationJsonContentType`) require of servers.

use crate::error::{ApiError, Kind};
use crate::model::MAX_BODY;
use crate::service::Service;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Most bytes of an oversized body read (and hashed, not kept) to authenticate the
/// request before it is refused.
pub const MAX_HASHED: u64 = 16 << 20;

/// Reads `body` (the request `parts` describe), refusing one over [`MAX_BODY`] bytes
/// (413, once the request is authenticated) and one whose framing is broken (400).
///
/// # Errors
///
/// RequestTooLargeException (413) for an oversized body whose signature holds; the
/// signature's own error when it does not; BadRequestException (400) when the body
/// cannot be read as HTTP frames it.
pub async fn read(svc: &Service, parts: &http::request::Parts, body: axum::body::Body) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(Kind::PayloadTooLarge, format!("the request body is over {MAX_BODY} bytes, this API's limit"));
    let mut stream = body.into_data_stream();
    let mut kept = BytesMut::new();
    let mut hasher: Option<Sha256> = None;
    let mut total: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(Kind::BadRequest, format!("the request body cannot be read: {e}")))?;
        total += chunk.len() as u64;
        if hasher.is_none() && kept.len() + chunk.len() <= MAX_BODY {
            kept.extend_from_slice(&chunk);
            continue;
        }
        if total > MAX_HASHED {
            // Past what is worth reading: authenticated over the hash it claims, if it
            // claims one; else refused as it would be whatever the key.
            if claims_hash(&parts.headers) {
                authenticate(svc, parts, None).await?;
            }
            return Err(too_large());
        }
        let h = hasher.get_or_insert_with(|| Sha256::new_with_prefix(std::mem::take(&mut kept)));
        h.update(&chunk);
    }
    match hasher {
        None => Ok(kept.freeze()),
        Some(h) => {
            let hash: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            authenticate(svc, parts, Some(&hash)).await?;
            Err(too_large())
        }
    }
}

/// True when the request claims its body's hash in a signed, hex `X-Amz-Content-Sha256`.
fn claims_hash(headers: &http::HeaderMap) -> bool {
    headers.get("x-amz-content-sha256").and_then(|v| v.to_str().ok()).is_some_and(|h| h.len() == 64)
}

/// Checks the signature of a request whose body was not kept: over `hash` (the body's,
/// computed while reading it), or over the hash it claims when `None`.
async fn authenticate(svc: &Service, parts: &http::request::Parts, hash: Option<&str>) -> Result<(), ApiError> {
    let key = svc.claimed_key(&parts.headers).await;
    let secret_of = |k: &str| key.as_ref().filter(|x| x.access_key == k).map(|x| x.secret.clone());
    let now = crate::clock::system();
    let signed = match hash {
        Some(h) => crate::sigv4::verify_payload_hash(&parts.method, &parts.uri, &parts.headers, h, now, secret_of),
        None => crate::sigv4::verify_streamed(&parts.method, &parts.uri, &parts.headers, now, secret_of),
    }?;
    let key =
        key.filter(|k| k.access_key == signed.access_key).ok_or_else(|| ApiError::new(Kind::UnrecognizedClient, "unknown access key"))?;
    // Temporary credentials count only with their session token.
    svc.caller_of(&parts.headers, &key).await.map(|_| ()).map_err(crate::service::SessionRefusal::into_api)
}

/// Checks a model operation's media type: `application/json` (with any parameters), or
/// none on a bodiless request.
///
/// # Errors
///
/// UnsupportedMediaTypeException (415) naming what was sent.
pub fn check_content_type(headers: &http::HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let bodiless = body.iter().all(u8::is_ascii_whitespace);
    match headers.get(http::header::CONTENT_TYPE) {
        None if bodiless => Ok(()),
        None => Err(ApiError::new(Kind::UnsupportedMediaType, "a request body must be sent as Content-Type: application/json")),
        Some(v) => {
            let media = v.to_str().unwrap_or_default().split(';').next().unwrap_or_default().trim();
            if media.eq_ignore_ascii_case("application/json") {
                Ok(())
            } else {
                Err(ApiError::new(
                    Kind::UnsupportedMediaType,
                    format!("Content-Type {media:?} is not supported: this API takes application/json (or no body and no Content-Type)"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_media_type_is_the_protocols() {
        assert!(check_content_type(&headers(Some("application/json")), b"{}").is_ok());
        assert!(check_content_type(&headers(Some("Application/JSON; charset=utf-8")), b"{}").is_ok());
        assert!(check_content_type(&headers(None), b"").is_ok());
        assert!(check_content_type(&headers(Some("application/json")), b"").is_ok());
        for (ct, body) in
            [(Some("text/plain"), &b"{}"[..]), (Some("application/hal+json"), b"{}"), (None, b"{}"), (Some("text/plain"), b"")]
        {
            let e = check_content_type(&headers(ct), body).unwrap_err();
            assert_eq!((e.kind, e.status()), (Kind::UnsupportedMediaType, 415), "{ct:?}");
        }
    }
}
