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

/// A UTC date and time: year, month, day, hour, minute, second.
pub type Civil = (i64, i64, i64, i64, i64, i64);

/// `secs` (since the epoch) as a UTC date and time. Howard Hinnant's civil-from-days: one
/// formula for SigV4's dates and the ISO 8601 times of IAM, STS and the metadata service,
/// rather than a date crate for three formatters.
pub fn civil(secs: i64) -> Civil {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `secs` (since the epoch) as ISO 8601 in UTC: `2026-01-02T03:04:05Z`.
pub fn iso8601(secs: f64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs.max(0.0).floor() as i64);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
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

    #[test]
    fn civil_dates() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_798_761_599.9), "2026-12-31T23:59:59Z");
        assert_eq!(civil(-1), (1969, 12, 31, 23, 59, 59));
    }
}
