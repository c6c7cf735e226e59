//! Crash points: named places where a fault test makes this process die at once, as a
//! `kill -9` at that moment would.
//!
//! `HEARTH_CRASH_AT=<name>[,<name>…]` in the environment of a debug build (tests build
//! in the dev profile) makes [`point`] SIGKILL the process the first time it reaches one
//! of those names; release builds compile every point to nothing. The names are listed
//! in `docs/RELIABILITY.md` (the fault matrix). Not the `fail` crate behind a cargo
//! feature: the fault test drives the `hearth` binary that `cargo test -p hearth` builds,
//! and a feature only tests enable would build the engine and the control plane twice
//! (once per feature set) on every machine that runs the suite.

/// The environment variable naming the points to die at.
pub const ENV: &str = "HEARTH_CRASH_AT";

/// Dies here (SIGKILL, no destructors, no flushing beyond what was already written) when
/// `name` is listed in [`ENV`]. Does nothing in release builds.
#[inline]
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    {
        static ARMED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let armed = ARMED.get_or_init(|| {
            std::env::var(ENV)
                .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default()
        });
        if armed.iter().any(|a| a == name) {
            eprintln!("hearth: crash point {name} reached; dying ({ENV})");
            // SAFETY: kill(2) on our own pid; no memory is involved.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
