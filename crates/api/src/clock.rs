//! The control plane's one source of wall-clock time: record times, token expiry, usage
//! periods, policies and request signatures all read it here (durations between two
//! moments use `Instant`, which no clock change moves).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in seconds since the epoch (the form records, tokens and usage keep).
pub fn now() -> f64 {
    secs(system())
}

/// Now, as a `SystemTime` (for SigV4's dates).
pub fn system() -> SystemTime {
    SystemTime::now()
}

/// `t` in seconds since the epoch (0 before it).
pub fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2025_and_secs_clamps_at_the_epoch() {
        assert!(now() > 1.7e9);
        assert_eq!(secs(UNIX_EPOCH - std::time::Duration::from_secs(5)), 0.0);
        assert_eq!(secs(UNIX_EPOCH + std::time::Duration::from_millis(1500)), 1.5);
    }
}
