//! Request rates per account: a token bucket (GCRA, from `governor`) per tenant, over every
//! authenticated call (the model's operations and Hearth's extensions alike). Over its
//! rate a call gets the model's ThrottlingException (429) with `Retry-After`, which the AWS
//! SDKs' retry logic honours.
//!
//! The rate is the operator's: a default for every account (`hearth serve --rate-limit`)
//! and an override per account (`hearth accounts set ACCOUNT --rate-limit`), seen by a
//! running daemon within [`SETTINGS_TTL`].

use crate::error::ApiError;
use governor::{clock::Clock, DefaultDirectRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an account's rate is used before it is read again.
pub const SETTINGS_TTL: Duration = Duration::from_secs(2);

/// A rate: `per_second` calls a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// Calls a second, sustained (0: unlimited).
    pub per_second: f64,
    /// Calls at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl Default for Rate {
    /// 200 calls a second with bursts of 400: far above what a person or an agent loop
    /// sends, low enough that one tenant's runaway script cannot starve the others.
    fn default() -> Self {
        Rate { per_second: 200.0, burst: 400 }
    }
}

impl Rate {
    /// Parses `RATE[/BURST]` (`0` or `unlimited`: no limit; the burst defaults to twice the
    /// rate, at least 1).
    ///
    /// # Errors
    ///
    /// A message saying the form.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("{s:?}: give CALLS_PER_SECOND[/BURST], e.g. 50/100, or 0 for no limit");
        if s == "unlimited" {
            return Ok(Rate { per_second: 0.0, burst: 1 });
        }
        let (rate, burst) = s.split_once('/').map_or((s, None), |(r, b)| (r, Some(b)));
        let per_second: f64 = rate.trim().parse().map_err(|_| bad())?;
        if !per_second.is_finite() || !(0.0..=1e6).contains(&per_second) {
            return Err(bad());
        }
        let burst = match burst {
            Some(b) => b.trim().parse::<u32>().ok().filter(|b| *b >= 1).ok_or_else(bad)?,
            None => ((per_second * 2.0).ceil() as u32).max(1),
        };
        Ok(Rate { per_second, burst })
    }

    fn quota(self) -> Option<Quota> {
        if self.per_second <= 0.0 {
            return None;
        }
        let q = Quota::with_period(Duration::from_secs_f64(1.0 / self.per_second))?;
        Some(q.allow_burst(NonZeroU32::new(self.burst.max(1))?))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.per_second <= 0.0 {
            return f.write_str("unlimited");
        }
        write!(f, "{}/s, bursts of {}", self.per_second, self.burst)
    }
}

struct Bucket {
    rate: Rate,
    read: Instant,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
}

/// The buckets of every account seen.
#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// True when `account`'s rate must be read again (unknown, or read over
    /// [`SETTINGS_TTL`] ago).
    pub fn stale(&self, account: &str) -> bool {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).get(account).is_none_or(|b| b.read.elapsed() > SETTINGS_TTL)
    }

    /// Sets `account`'s rate as just read; its bucket is kept when the rate is unchanged.
    pub fn set(&self, account: &str, rate: Rate) {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match all.get_mut(account) {
            Some(b) if b.rate == rate => b.read = Instant::now(),
            _ => {
                let limiter = rate.quota().map(|q| Arc::new(DefaultDirectRateLimiter::direct(q)));
                all.insert(account.to_owned(), Bucket { rate, read: Instant::now(), limiter });
            }
        }
    }

    /// Takes one call from `account`'s bucket.
    ///
    /// # Errors
    ///
    /// ThrottlingException with `Retry-After` (whole seconds, at least 1) when the bucket is
    /// empty.
    pub fn check(&self, account: &str) -> Result<(), ApiError> {
        let (limiter, rate) = {
            let all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            match all.get(account) {
                Some(b) => (b.limiter.clone(), b.rate),
                None => return Ok(()),
            }
        };
        let Some(limiter) = limiter else { return Ok(()) };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            ApiError::throttled(format!("account {account} is over its request rate ({rate}); retry after {secs} s"), secs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_clear_refusals() {
        assert_eq!(Rate::parse("50/100").unwrap(), Rate { per_second: 50.0, burst: 100 });
        assert_eq!(Rate::parse("0.5").unwrap(), Rate { per_second: 0.5, burst: 1 });
        assert_eq!(Rate::parse("10").unwrap(), Rate { per_second: 10.0, burst: 20 });
        assert_eq!(Rate::parse("0").unwrap().to_string(), "unlimited");
        for bad in ["", "x", "-1", "5/0", "5/x", "NaN", "inf"] {
            assert!(Rate::parse(bad).unwrap_err().contains("CALLS_PER_SECOND"), "{bad}");
        }
    }

    #[test]
    fn a_burst_passes_then_calls_are_throttled_with_a_retry_after() {
        let l = Limiter::default();
        l.set("a", Rate { per_second: 0.2, burst: 3 });
        l.set("b", Rate::parse("0").unwrap());
        for _ in 0..3 {
            l.check("a").unwrap();
        }
        let e = l.check("a").unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Throttling);
        assert_eq!(e.status(), 429);
        // One call every 5 s: the next is 5 s away.
        assert_eq!(e.retry_after, Some(5));
        assert!(e.message.contains("over its request rate (0.2/s, bursts of 3)"), "{}", e.message);
        // Other accounts have their own buckets; unlimited and unknown ones pass.
        for _ in 0..1000 {
            l.check("b").unwrap();
        }
        l.check("unknown").unwrap();
        // The same rate keeps the bucket (still empty); a new one starts full.
        l.set("a", Rate { per_second: 0.2, burst: 3 });
        assert!(l.check("a").is_err());
        l.set("a", Rate { per_second: 0.2, burst: 4 });
        assert!(l.check("a").is_ok());
        assert!(!l.stale("a"));
        assert!(l.stale("c"));
    }
}
