//! Code the `hearth` and `hearth-bench` binaries share. Each binary keeps its own commands;
//! only what both need lives here, so `hearth` carries no benchmark code.

#![deny(missing_docs)]

pub mod vmargs;

/// Logs to stderr at `level` (RUST_LOG overrides it), as JSON objects, one per line, when
/// `json` (for log collectors).
pub fn logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    if json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
}
