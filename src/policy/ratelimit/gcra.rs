//! GCRA, the generic cell rate algorithm: a rate limit with a burst, exact for any burst, with one
//! timestamp of state per key (the *theoretical arrival time*, TAT).
//!
//! A limit of `rate` requests per `period` with a `burst` is two numbers: the emission interval
//! `T = period / rate` (how far apart requests are at the sustained rate) and the tolerance
//! `τ = T × (burst − 1)` (how far ahead of schedule a client may run). A request at time `now`
//! is allowed when `max(TAT, now) − now ≤ τ`; allowing it moves `TAT` to `max(TAT, now) + T`.
//! A key whose `TAT ≤ now` is in the same state as a key never seen, so idle keys can be dropped
//! without changing any decision.
//!
//! Worked example: `rate: 10/s, burst: 3` gives `T = 100 ms`, `τ = 200 ms`. Four requests at
//! t = 0: the first finds TAT = 0 (new key), allowed, TAT = 100 ms; the second: 100 − 0 ≤ 200,
//! allowed, TAT = 200; the third: 200 ≤ 200, allowed, TAT = 300; the fourth: 300 > 200, refused,
//! retry after 300 − 200 = 100 ms. At t = 150 ms: 300 − 150 = 150 ≤ 200, allowed, TAT = 400. A
//! client sending steadily at 10/s is always allowed; at 20/s, half its requests are refused.

/// A compiled limit, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// `T`: the emission interval.
    pub interval: u64,
    /// `τ`: how far ahead of schedule a key may run.
    pub tolerance: u64,
    /// The burst it was made from (the `q` of `RateLimit-Policy`).
    pub burst: u32,
}

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The key's new TAT (allowed) or its unchanged TAT (refused).
    pub tat: u64,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// Nanoseconds until one more request would be allowed (0 when one is).
    pub retry_after: u64,
    /// Nanoseconds until the key is back to a full burst.
    pub reset_after: u64,
}

impl Limit {
    /// `rate` requests per `period_ns` with `burst` (at least 1).
    pub fn new(rate: u32, period_ns: u64, burst: u32) -> Self {
        let interval = (period_ns / u64::from(rate.max(1))).max(1);
        let burst = burst.max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            burst,
        }
    }

    /// The same limit with its rate scaled by `factor` (0 < factor): an adaptive multiplier, or
    /// this replica's share of a shared limit. The burst scales too, never below 1.
    /// Factors are clamped to [0.001, 1000]; the interval to at most a year.
    pub fn scaled(self, factor: f64) -> Self {
        if (factor - 1.0).abs() < f64::EPSILON || !factor.is_finite() {
            return self;
        }
        let factor = factor.clamp(0.001, 1000.0);
        const YEAR: f64 = 365.0 * 86_400.0 * 1e9;
        let interval = ((self.interval as f64) / factor).clamp(1.0, YEAR) as u64;
        let burst = ((f64::from(self.burst) * factor)
            .floor()
            .min(f64::from(u32::MAX)) as u32)
            .max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            burst,
        }
    }

    /// Decides one request at `now` for a key whose stored TAT is `tat` (0 for a new key).
    pub fn check(&self, tat: u64, now: u64) -> Verdict {
        let start = tat.max(now);
        let ahead = start - now;
        if ahead > self.tolerance {
            return Verdict {
                allowed: false,
                tat,
                remaining: 0,
                retry_after: ahead - self.tolerance,
                reset_after: ahead,
            };
        }
        let new_tat = start.saturating_add(self.interval);
        let ahead = new_tat - now;
        let slack = (self.tolerance.saturating_add(self.interval)).saturating_sub(ahead);
        Verdict {
            allowed: true,
            tat: new_tat,
            remaining: (slack / self.interval).min(u64::from(u32::MAX)) as u32,
            retry_after: 0,
            reset_after: ahead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    #[test]
    fn the_worked_example_in_the_module_docs() {
        let limit = Limit::new(10, S, 3);
        assert_eq!((limit.interval, limit.tolerance), (100 * MS, 200 * MS));
        let mut tat = 0;
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            let verdict = limit.check(tat, 0);
            outcomes.push((verdict.allowed, verdict.remaining, verdict.retry_after));
            tat = verdict.tat;
        }
        assert_eq!(
            outcomes,
            vec![
                (true, 2, 0),
                (true, 1, 0),
                (true, 0, 0),
                (false, 0, 100 * MS)
            ]
        );
        let verdict = limit.check(tat, 150 * MS);
        assert!(verdict.allowed);
        assert_eq!(verdict.tat, 400 * MS);
    }

    #[test]
    fn a_steady_client_gets_exactly_the_rate_plus_the_burst() {
        // 100/s with burst 10, a client sending 1,000/s for 2 s: 10 + 200 allowed (±1)
        let limit = Limit::new(100, S, 10);
        let (mut tat, mut allowed) = (0, 0);
        for i in 0..2_000u64 {
            let verdict = limit.check(tat, i * MS);
            if verdict.allowed {
                allowed += 1;
                tat = verdict.tat;
            }
        }
        assert!((209..=211).contains(&allowed), "{allowed}");
    }

    #[test]
    fn scaling_keeps_the_shape() {
        let limit = Limit::new(100, S, 10);
        let tenth = limit.scaled(0.1);
        assert_eq!(tenth.interval, 100 * MS);
        assert_eq!(tenth.burst, 1);
        assert_eq!(limit.scaled(1.0), limit);
    }
}
