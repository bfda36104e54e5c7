//! Request rate limits (GCRA, from `governor`): one budget per source address, checked before
//! anything else is read, and one per API key, checked once the signature verified. A caller
//! over budget gets 429 `rate_limited` with `Retry-After`; other callers are unaffected.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::Error;

pub struct Limits {
    per_source: DefaultKeyedRateLimiter<IpAddr>,
    per_key: DefaultKeyedRateLimiter<String>,
}

/// `per_second` sustained, bursts of twice that.
fn quota(per_second: u32) -> Quota {
    let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    pub fn new(per_source: u32, per_key: u32) -> Limits {
        Limits {
            per_source: RateLimiter::keyed(quota(per_source)),
            per_key: RateLimiter::keyed(quota(per_key)),
        }
    }

    pub fn check_source(&self, source: IpAddr) -> Result<(), Error> {
        self.per_source.check_key(&source).map_err(refusal)
    }

    pub fn check_key(&self, key_id: &str) -> Result<(), Error> {
        self.per_key.check_key(&key_id.to_string()).map_err(refusal)
    }

    /// Drops the state of callers that have been quiet long enough to be back at full budget.
    pub fn forget_idle(&self) {
        self.per_source.retain_recent();
        self.per_source.shrink_to_fit();
        self.per_key.retain_recent();
        self.per_key.shrink_to_fit();
    }
}

fn refusal(not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Error {
    let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
    Error::RateLimited {
        retry_after_secs: wait.as_secs().max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_beyond_the_budget_is_refused_for_that_caller_only() {
        let limits = Limits::new(5, 5);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let allowed = (0..50).filter(|_| limits.check_source(a).is_ok()).count();
        assert!((10..=12).contains(&allowed), "{allowed} of 50 allowed");
        let refused = limits.check_source(a).unwrap_err();
        assert_eq!(
            (refused.status().as_u16(), refused.code()),
            (429, "rate_limited")
        );
        assert!(
            limits.check_source(b).is_ok(),
            "another source shares the budget"
        );
        assert!(limits.check_key("key-1").is_ok());
    }
}
