//! IAM and STS over the AWS query protocol: a form-encoded body (`Action=…&Version=…`),
//! answered with `<ActionResponse><ActionResult>…</ActionResult>…` XML.

use super::AwsError;
use crate::auth::Caller;
use crate::service::Service;
use axum::response::Response;
use std::sync::Arc;

/// `s` escaped for XML text and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Runs one IAM or STS call.
///
/// # Errors
///
/// The service's refusals.
pub async fn handle(_svc: &Arc<Service>, _caller: &Caller, service: &str, _body: &[u8]) -> Result<Response, AwsError> {
    Err(AwsError::bad("InvalidAction", format!("{service}: not served yet")))
}
