//! API errors as the service sends them: the model's error shape name in
//! `x-amzn-ErrorType`, its status code, and a JSON body with `message` (and
//! `resourceId`/`resourceType` where the shape has them).

use axum::response::{IntoResponse, Response};

/// The error kinds Hearth answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bad input (400).
    Validation,
    /// No such resource, or another tenant's (404).
    NotFound,
    /// Not allowed in the resource's current state (409).
    Conflict,
    /// Authenticated but not allowed (403).
    AccessDenied,
    /// Unknown access key (403).
    UnrecognizedClient,
    /// Signature missing, malformed, expired or wrong (403).
    InvalidSignature,
    /// An account's quota is used up (402).
    Quota,
    /// An account's request rate is over its limit (429, with `Retry-After`).
    Throttling,
    /// The host cannot hold what was asked (500).
    InsufficientCapacity,
    /// Hearth's own failure (500).
    Internal,
    /// No operation at this path (404).
    UnknownOperation,
    /// The path exists with another method (405).
    MethodNotAllowed,
    /// The request body is over the API's limit (413, after authentication).
    PayloadTooLarge,
    /// A body that is not `application/json`, as rest-json servers answer (415).
    UnsupportedMediaType,
    /// A request that is not well-formed HTTP: its body's framing is broken (400).
    BadRequest,
}

impl Kind {
    /// The wire name (the model's error shape, or the service's own name for auth errors).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Validation => "ValidationException",
            Kind::NotFound => "ResourceNotFoundException",
            Kind::Conflict => "ConflictException",
            Kind::AccessDenied => "AccessDeniedException",
            Kind::UnrecognizedClient => "UnrecognizedClientException",
            Kind::InvalidSignature => "InvalidSignatureException",
            Kind::Quota => "ServiceQuotaExceededException",
            Kind::Throttling => "ThrottlingException",
            Kind::InsufficientCapacity => "InsufficientCapacityException",
            Kind::Internal => "InternalServerException",
            Kind::UnknownOperation => "UnknownOperationException",
            Kind::MethodNotAllowed => "MethodNotAllowedException",
            // Lambda's own names for these answers (its Invoke API has both shapes).
            Kind::PayloadTooLarge => "RequestTooLargeException",
            Kind::UnsupportedMediaType => "UnsupportedMediaTypeException",
            Kind::BadRequest => "BadRequestException",
        }
    }

    /// HTTP status: the model's where it defines the shape.
    pub fn status(self) -> u16 {
        if let Some(s) = crate::model::model().error_status(self.name()) {
            return s;
        }
        match self {
            Kind::UnrecognizedClient | Kind::InvalidSignature => 403,
            Kind::UnknownOperation => 404,
            Kind::MethodNotAllowed => 405,
            Kind::PayloadTooLarge => 413,
            Kind::UnsupportedMediaType => 415,
            Kind::BadRequest => 400,
            _ => 500,
        }
    }
}

/// One error answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.name())]
pub struct ApiError {
    /// Kind.
    pub kind: Kind,
    /// Human-readable message.
    pub message: String,
    /// The resource concerned.
    pub resource: Option<(String, String)>,
    /// When to try again (`retryAfterSeconds`, in the shapes that have it: the
    /// `Retry-After` header).
    pub retry_after: Option<u64>,
    /// The quota concerned (`quotaCode`, with `serviceCode`), for quota and throttling
    /// errors.
    pub quota_code: Option<&'static str>,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), resource: None, retry_after: None, quota_code: None }
    }

    /// A ValidationException.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(Kind::Validation, message)
    }

    /// A body that is not JSON (a ValidationException, as the service answers).
    pub fn serialization(message: impl Into<String>) -> Self {
        Self::new(Kind::Validation, message)
    }

    /// A ResourceNotFoundException for `kind` `id`.
    pub fn not_found(resource_type: &str, id: &str) -> Self {
        ApiError {
            kind: Kind::NotFound,
            message: format!("{resource_type} {id} not found"),
            resource: Some((resource_type.into(), id.into())),
            retry_after: None,
            quota_code: None,
        }
    }

    /// A ConflictException about `id`.
    pub fn conflict(resource_type: &str, id: &str, message: impl Into<String>) -> Self {
        ApiError {
            kind: Kind::Conflict,
            message: message.into(),
            resource: Some((resource_type.into(), id.into())),
            retry_after: None,
            quota_code: None,
        }
    }

    /// An InternalServerException; the cause is logged (with an id), the client gets a
    /// generic message with that id.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(%cause, error_id = id, "internal error");
        Self::new(Kind::Internal, format!("internal error #{id}; the server's log has the details"))
    }

    /// An InternalServerException whose message is the client's to read (Hearth wrote it
    /// to say what failed and what to do; no cause of unknown content goes in it), with
    /// `retryAfterSeconds`.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError { retry_after: Some(retry_after), ..Self::new(Kind::Internal, message) }
    }

    /// A ServiceQuotaExceededException: quota `code` of the account is used up.
    pub fn quota(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { quota_code: Some(code), ..Self::new(Kind::Quota, message) }
    }

    /// A ThrottlingException: the account's request rate is over its limit; try again in
    /// `retry_after` seconds.
    pub fn throttled(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError { retry_after: Some(retry_after), quota_code: Some("request-rate"), ..Self::new(Kind::Throttling, message) }
    }

    /// An InsufficientCapacityException: the host cannot hold it now.
    pub fn capacity(message: impl Into<String>) -> Self {
        Self::new(Kind::InsufficientCapacity, message)
    }

    /// Its HTTP status.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

impl<S: crate::lifecycle::Lifecycle> From<crate::lifecycle::InvalidTransition<S>> for ApiError {
    /// A move the lifecycle's table refuses: a ConflictException about the resource.
    fn from(e: crate::lifecycle::InvalidTransition<S>) -> Self {
        ApiError::conflict(S::RESOURCE, &e.id, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    /// The store failed: Hearth's error (500), the cause logged.
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<hearth_vmm::AgentError> for ApiError {
    /// The agent's refusals are the caller's (a missing file: 404; a full guest disk: 413,
    /// its message saying how to grow it; a path that already exists: 409; anything else it
    /// refused: 400); a failure to reach or understand it is Hearth's (500).
    fn from(e: hearth_vmm::AgentError) -> Self {
        use hearth_proto::ErrorCode as C;
        match e {
            hearth_vmm::AgentError::Remote(b) if b.code == C::NotFound => ApiError::new(Kind::NotFound, b.message),
            hearth_vmm::AgentError::Remote(b) if b.code == C::StorageFull => {
                ApiError::new(Kind::PayloadTooLarge, format!("the microvm's disk is full: {}", b.message))
            }
            hearth_vmm::AgentError::Remote(b) if b.code == C::AlreadyExists => ApiError::new(Kind::Conflict, b.message),
            hearth_vmm::AgentError::Remote(b) => ApiError::validation(b.message),
            other => ApiError::internal(other),
        }
    }
}

impl From<hearth_vmm::VmError> for ApiError {
    /// The agent's errors as [`From<hearth_vmm::AgentError>`]; a VM whose QEMU is gone is
    /// a ConflictException (the microvm is, or is about to be, TERMINATED); a network
    /// change the VM cannot take (no network, a rule it refuses) is the caller's (400);
    /// the rest is Hearth's (500).
    fn from(e: hearth_vmm::VmError) -> Self {
        match e {
            hearth_vmm::VmError::Stopped { status, .. } => ApiError::new(
                Kind::Conflict,
                format!(
                    "the microvm's VM has stopped ({}); it is TERMINATED (GetMicrovm gives the reason): run another",
                    hearth_vmm::QemuExit::from_status(status)
                ),
            ),
            hearth_vmm::VmError::GuestPanicked { .. } => ApiError::new(
                Kind::Conflict,
                "the microvm's guest kernel panicked and its VM stopped; it is TERMINATED (GetMicrovm gives the console's last lines): run another",
            ),
            hearth_vmm::VmError::Agent(a) => a.into(),
            hearth_vmm::VmError::Network(n) => ApiError::validation(n.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "message": self.message });
        if let Some((t, id)) = &self.resource {
            body["resourceType"] = t.clone().into();
            body["resourceId"] = id.clone().into();
        }
        if let Some(code) = self.quota_code {
            body["quotaCode"] = code.into();
            body["serviceCode"] = "hearth".into();
        }
        let status = http::StatusCode::from_u16(self.status()).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut r =
            (status, [("x-amzn-errortype", self.kind.name()), ("content-type", "application/json")], body.to_string()).into_response();
        // The model puts `retryAfterSeconds` in this header (ThrottlingException,
        // InternalServerException); botocore reads it there.
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(http::header::RETRY_AFTER, s.into());
        }
        r
    }
}
