//! Secrets Manager and KMS over the AWS JSON 1.1 protocol: the operation in
//! `X-Amz-Target` (`secretsmanager.GetSecretValue`, `TrentService.CreateKey`), a JSON body
//! and answer (`application/x-amz-json-1.1`).

use super::AwsError;
use crate::auth::Caller;
use crate::service::Service;
use axum::response::Response;
use std::sync::Arc;

/// Runs one Secrets Manager or KMS call.
///
/// # Errors
///
/// The service's refusals.
pub async fn handle(
    _svc: &Arc<Service>,
    _caller: &Caller,
    service: &str,
    _headers: &http::HeaderMap,
    _body: &[u8],
) -> Result<Response, AwsError> {
    Err(AwsError::bad("UnknownOperationException", format!("{service}: not served yet")))
}
