//! Hearth's control plane: the Lambda MicroVMs API (2025-09-09) as `hearth serve`.
//!
//! - [`model`]: the service model as data: routing and input validation.
//! - [`inputs`]: the operations' inputs as types generated from the model.
//! - [`sigv4`]: SigV4 verification of every request.
//! - [`lifecycle`]: the state enums of microvms, images and versions, and their transition tables.
//! - [`clock`]: the one source of wall-clock time.
//! - [`store`]: the state behind one async trait (tenants' keys, microvms, images, tags,
//!   idempotency, usage), and its SQLite back end.
//! - [`quota`], [`capacity`], [`ratelimit`]: what one tenant may hold, what the host can
//!   hold, how fast a tenant may call.
//! - [`service`]: the operations and the microvm lifecycle, idle and lifetime policies.
//! - [`auth`]: who calls ([`auth::Caller`]: an account's root key or a role's session) and
//!   the one permission check.
//! - [`aws`]: IAM, STS, Secrets Manager and KMS subsets at `POST /`.
//! - [`imds`]: the metadata service (IMDSv2) of microvms, relayed over their agent channel.
//! - [`server`]: HTTP: authentication, dispatch, idempotency, Hearth's extensions.

#![deny(missing_docs)]

pub use hearth_seal as at_rest;
pub mod auth;
pub mod aws;
pub mod body;
pub mod capacity;
pub mod client;
pub mod clock;
pub mod endpoint;
pub mod error;
pub mod extensions;
pub mod files;
pub mod framing;
pub mod imds;
pub mod ingress;
pub mod inputs;
pub mod keys;
pub mod lifecycle;
pub mod links;
pub mod mcp_route;
pub mod metrics;
pub mod model;
pub mod quota;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod shell;
pub mod sigv4;
pub mod store;
pub mod tls;
pub mod upload;
