//! Secrets Manager and KMS over the AWS JSON 1.1 protocol: the operation in
//! `X-Amz-Target` (`secretsmanager.GetSecretValue`, `TrentService.CreateKey`), a JSON body
//! and answer (`application/x-amz-json-1.1`).
//!
//! The body is bounded ([`MAX_JSON_BODY`]) and must be one JSON object; each operation
//! reads its members through [`Input`], which checks their types, so a malformed request is
//! a 400 in the service's own terms, never a 5xx.

use super::AwsError;
use crate::auth::Caller;
use crate::service::Service;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::Arc;

/// The largest JSON body read: a secret's value is at most 65,536 bytes (87,384 in
/// base64), and nothing else these services take comes near.
pub const MAX_JSON_BODY: usize = 256 << 10;

/// Runs one Secrets Manager or KMS call.
///
/// # Errors
///
/// The service's refusals.
pub async fn handle(
    svc: &Arc<Service>,
    caller: &Caller,
    service: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<Response, AwsError> {
    let prefix = match service {
        "secretsmanager" => "secretsmanager",
        _ => "TrentService",
    };
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let op = target
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .filter(|op| !op.is_empty() && op.len() <= 64 && op.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| {
            let shown: String = target.chars().take(80).collect();
            AwsError::bad("UnknownOperationException", format!("X-Amz-Target {shown:?} does not name an operation of {prefix}"))
        })?;
    if body.len() > MAX_JSON_BODY {
        return Err(AwsError::new(413, "RequestEntityTooLargeException", format!("the request body is over {MAX_JSON_BODY} bytes")));
    }
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(body).map_err(|e| AwsError::bad("SerializationException", format!("the request body is not JSON: {e}")))?
    };
    if !input.is_object() {
        return Err(AwsError::bad("SerializationException", "the request body must be a JSON object"));
    }
    let out = match service {
        "secretsmanager" => svc.secrets_call(caller, op, &input).await?,
        _ => svc.kms_call(caller, op, &input).await?,
    };
    Ok(([("content-type", "application/x-amz-json-1.1"), ("x-amzn-requestid", crate::keys::random_hex(16).as_str())], out.to_string())
        .into_response())
}

impl From<crate::store::StoreError> for AwsError {
    fn from(e: crate::store::StoreError) -> Self {
        AwsError::from(crate::error::ApiError::from(e))
    }
}

/// The error for an operation the service does not serve.
pub fn unknown_operation(service: &str, op: &str) -> AwsError {
    AwsError::bad("UnknownOperationException", format!("{op} is not an operation of {service} that Hearth serves"))
}

/// A request's members, read with their types checked; a wrong one is a 400 with `code`
/// (`InvalidParameterException` for Secrets Manager, `ValidationException` for KMS).
pub struct Input<'a> {
    v: &'a Value,
    code: &'static str,
}

impl<'a> Input<'a> {
    /// The members of `v`, refused with `code`.
    pub fn new(v: &'a Value, code: &'static str) -> Self {
        Input { v, code }
    }

    /// An error with this input's code.
    pub fn bad(&self, message: impl Into<String>) -> AwsError {
        AwsError::bad(self.code, message)
    }

    /// Member `k` if present (null counts as absent).
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|x| !x.is_null())
    }

    /// String member `k`.
    pub fn str(&self, k: &str) -> Result<Option<&'a str>, AwsError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(format!("{k} must be a string"))),
        }
    }

    /// Required string member `k`.
    pub fn req(&self, k: &str) -> Result<&'a str, AwsError> {
        self.str(k)?.ok_or_else(|| self.bad(format!("{k} is required")))
    }

    /// Integer member `k`.
    pub fn int(&self, k: &str) -> Result<Option<i64>, AwsError> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x.as_i64().map(Some).ok_or_else(|| self.bad(format!("{k} must be an integer"))),
        }
    }

    /// Boolean member `k`.
    pub fn bool(&self, k: &str) -> Result<Option<bool>, AwsError> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x.as_bool().map(Some).ok_or_else(|| self.bad(format!("{k} must be a boolean"))),
        }
    }

    /// List member `k`.
    pub fn list(&self, k: &str) -> Result<Option<&'a Vec<Value>>, AwsError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.bad(format!("{k} must be a list"))),
        }
    }

    /// List-of-strings member `k`, at most `max` long.
    pub fn strings(&self, k: &str, max: usize) -> Result<Option<Vec<&'a str>>, AwsError> {
        let Some(a) = self.list(k)? else { return Ok(None) };
        if a.len() > max {
            return Err(self.bad(format!("{k} has {} members; at most {max}", a.len())));
        }
        a.iter().map(|x| x.as_str().ok_or_else(|| self.bad(format!("{k} must be a list of strings")))).collect::<Result<_, _>>().map(Some)
    }

    /// Tags (`[{"Key": …, "Value": …}]`, at most 50; keys 1-128, values at most 256
    /// characters), as pairs.
    pub fn tags(&self, k: &str) -> Result<Option<Vec<(String, String)>>, AwsError> {
        let Some(a) = self.list(k)? else { return Ok(None) };
        if a.len() > MAX_TAGS {
            return Err(self.bad(format!("{k} has {} tags; at most {MAX_TAGS}", a.len())));
        }
        let mut out = Vec::new();
        for t in a {
            let key = t.get("Key").or_else(|| t.get("TagKey")).and_then(Value::as_str);
            let value = t.get("Value").or_else(|| t.get("TagValue")).and_then(Value::as_str).unwrap_or_default();
            let Some(key) = key.filter(|k| !k.is_empty() && k.chars().count() <= 128) else {
                return Err(self.bad("every tag needs a Key of 1 to 128 characters"));
            };
            if value.chars().count() > 256 {
                return Err(self.bad(format!("the value of tag {key:?} is over 256 characters")));
            }
            if key.starts_with("aws:") {
                return Err(self.bad("tag keys starting with aws: are reserved"));
            }
            out.push((key.to_owned(), value.to_owned()));
        }
        Ok(Some(out))
    }
}

/// The most tags on a secret or key.
pub const MAX_TAGS: usize = 50;

/// Merges `new` into `tags` (a key given again takes the new value); refused over
/// [`MAX_TAGS`].
pub fn merge_tags(tags: &mut Vec<(String, String)>, new: Vec<(String, String)>, code: &'static str) -> Result<(), AwsError> {
    for (k, v) in new {
        match tags.iter_mut().find(|(x, _)| *x == k) {
            Some(t) => t.1 = v,
            None => tags.push((k, v)),
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(AwsError::bad(code, format!("a resource has at most {MAX_TAGS} tags")));
    }
    Ok(())
}

/// Tags in the wire form.
pub fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Array(tags.iter().map(|(k, v)| serde_json::json!({ "Key": k, "Value": v })).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_are_type_checked() {
        let v = json!({ "A": "x", "B": 3, "C": [1], "D": null, "T": [{ "Key": "k", "Value": "v" }] });
        let i = Input::new(&v, "InvalidParameterException");
        assert_eq!(i.req("A").unwrap(), "x");
        assert_eq!(i.str("D").unwrap(), None);
        assert_eq!(i.req("B").unwrap_err().code, "InvalidParameterException");
        assert_eq!(i.int("B").unwrap(), Some(3));
        assert!(i.int("A").is_err());
        assert!(i.strings("C", 5).is_err());
        assert_eq!(i.tags("T").unwrap().unwrap(), vec![("k".to_owned(), "v".to_owned())]);
        let bad = json!({ "T": [{ "Key": "", "Value": "v" }] });
        assert!(Input::new(&bad, "X").tags("T").is_err());
        let mut tags = vec![("a".to_owned(), "1".to_owned())];
        merge_tags(&mut tags, vec![("a".into(), "2".into()), ("b".into(), "3".into())], "X").unwrap();
        assert_eq!(tags, vec![("a".to_owned(), "2".to_owned()), ("b".to_owned(), "3".to_owned())]);
        let many: Vec<_> = (0..51).map(|n| (n.to_string(), String::new())).collect();
        assert!(merge_tags(&mut tags, many, "X").is_err());
    }
}
