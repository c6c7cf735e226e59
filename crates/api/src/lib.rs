//! Hearth's control plane: the Lambda MicroVMs API.

#![deny(missing_docs)]

pub mod error;
pub mod model;
pub mod sigv4;
