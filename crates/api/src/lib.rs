//! Hearth's control plane: the Lambda MicroVMs API (2025-09-09) as `hearth serve`.
//!
//! - [`model`]: the service model as data: routing and input validation.
//! - [`sigv4`]: SigV4 verification of every request.
//! - [`store`]: the SQLite state (tenants' keys, microvms, images, tags, idempotency, usage).
//! - [`service`]: the operations and the microvm lifecycle, idle and lifetime policies.
//! - [`server`]: HTTP: authentication, dispatch, idempotency, Hearth's extensions.

#![deny(missing_docs)]

pub mod client;
pub mod error;
pub mod ingress;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod server;
pub mod service;
pub mod shell;
pub mod sigv4;
pub mod store;
pub mod upload;
