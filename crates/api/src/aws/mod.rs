//! The AWS-compatible services the daemon serves beside the Lambda MicroVMs API, at
//! `POST /` as AWS serves them, told apart by the signing name of the request's SigV4
//! credential scope:
//!
//! | signing name | protocol | operations |
//! |---|---|---|
//! | `iam` | query (form body, XML answers) | roles and their inline policies ([`query`], [`crate::service`]'s `iam`) |
//! | `sts` | query | GetCallerIdentity, AssumeRole |
//! | `secretsmanager` | JSON 1.1 (`X-Amz-Target: secretsmanager.<Op>`) | secrets ([`json`]) |
//! | `kms` | JSON 1.1 (`X-Amz-Target: TrentService.<Op>`) | keys and aliases |
//!
//! So `aws iam … --endpoint-url`, boto3's `iam`, `sts`, `secretsmanager` and `kms` clients
//! work unchanged against the daemon, and from inside a microvm through its metadata
//! service. Every answer, refusals included, is in the protocol's own shape: botocore
//! reads a query service's errors from XML and a JSON service's from `__type`.

pub mod json;
pub mod policy;
pub mod query;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::Service;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::sync::Arc;

/// The wire protocol of a request at `POST /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// AWS query: a form-encoded body with `Action` and `Version`; XML answers.
    Query,
    /// AWS JSON 1.1: the operation in `X-Amz-Target`, a JSON body and answer.
    Json,
}

/// The protocol a request speaks: JSON 1.1 when it names an `X-Amz-Target`, else query.
pub fn protocol_of(headers: &http::HeaderMap) -> Protocol {
    if headers.contains_key("x-amz-target") {
        Protocol::Json
    } else {
        Protocol::Query
    }
}

/// True for the signing names served at `POST /` ([`dispatch`]).
pub fn is_aws_service(service: &str) -> bool {
    matches!(service, "iam" | "sts" | "secretsmanager" | "kms")
}

/// An error in an AWS service's own terms: its code (`NoSuchEntity`,
/// `ResourceNotFoundException`, …), HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} ({status}): {message}")]
pub struct AwsError {
    /// HTTP status (4xx for every refusal of the caller's input).
    pub status: u16,
    /// The service's error code.
    pub code: String,
    /// What went wrong, and what to do.
    pub message: String,
}

impl AwsError {
    /// An error with `code` and `status`.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> AwsError {
        AwsError { status, code: code.to_owned(), message: message.into() }
    }

    /// A 400 with `code`.
    pub fn bad(code: &str, message: impl Into<String>) -> AwsError {
        Self::new(400, code, message)
    }
}

impl From<ApiError> for AwsError {
    /// The daemon's own refusals (authentication, throttling, internal errors) under the
    /// names AWS's query and JSON services use for them.
    fn from(e: ApiError) -> Self {
        use crate::error::Kind;
        let (status, code) = match e.kind {
            Kind::AccessDenied => (403, "AccessDeniedException"),
            Kind::UnrecognizedClient => (403, "UnrecognizedClientException"),
            Kind::InvalidSignature => (403, "InvalidSignatureException"),
            Kind::Throttling => (400, "ThrottlingException"),
            Kind::Validation | Kind::BadRequest => (400, "ValidationException"),
            Kind::NotFound => (400, "ResourceNotFoundException"),
            Kind::Conflict => (400, "ConflictException"),
            Kind::PayloadTooLarge => (413, "RequestEntityTooLarge"),
            Kind::Quota => (400, "LimitExceededException"),
            _ => (500, "InternalFailure"),
        };
        AwsError::new(status, code, e.message)
    }
}

/// The answer to `err` in `protocol`'s shape.
pub fn error_response(protocol: Protocol, err: &AwsError) -> Response {
    let status = http::StatusCode::from_u16(err.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let request_id = crate::keys::random_hex(16);
    match protocol {
        Protocol::Query => {
            let kind = if err.status < 500 { "Sender" } else { "Receiver" };
            let body = format!(
                "<ErrorResponse><Error><Type>{kind}</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
                query::xml_escape(&err.code),
                query::xml_escape(&err.message)
            );
            (status, [("content-type", "text/xml"), ("x-amzn-requestid", request_id.as_str())], body).into_response()
        }
        Protocol::Json => {
            let body = serde_json::json!({ "__type": err.code, "message": err.message });
            (
                status,
                [
                    ("content-type", "application/x-amz-json-1.1"),
                    ("x-amzn-errortype", err.code.as_str()),
                    ("x-amzn-requestid", request_id.as_str()),
                ],
                body.to_string(),
            )
                .into_response()
        }
    }
}

/// Runs a request at `POST /` signed for `service` by `caller`.
pub async fn dispatch(svc: &Arc<Service>, caller: &Caller, service: &str, headers: &http::HeaderMap, body: Bytes) -> Response {
    let protocol = protocol_of(headers);
    let answer = match (service, protocol) {
        ("iam" | "sts", Protocol::Query) => query::handle(svc, caller, service, &body).await,
        ("secretsmanager" | "kms", Protocol::Json) => json::handle(svc, caller, service, headers, &body).await,
        (s, p) => Err(AwsError::bad(
            "InvalidAction",
            format!(
                "{s} is served with the AWS {} protocol; this request used the other",
                if p == Protocol::Json { "query" } else { "JSON 1.1" }
            ),
        )),
    };
    match answer {
        Ok(r) => r,
        Err(e) => {
            if e.status >= 500 {
                tracing::error!(service, code = %e.code, message = %e.message, "an AWS-compatible call failed");
            }
            error_response(protocol, &e)
        }
    }
}
