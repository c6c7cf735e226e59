//! Code the `hearth` and `hearth-bench` binaries share. Each binary keeps its own commands;
//! only what both need lives here, so `hearth` carries no benchmark code.

#![deny(missing_docs)]

pub mod vmargs;
