//! A retry budget: retries may add at most a share of an upstream's traffic, so a failing backend
//! is not hit with a retry storm. Lock-free: one atomic balance of milli-tokens.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::Instant,
};

/// Each request deposits `percent/100` of a token; each retry withdraws one. A floor of
/// `min_per_second` tokens per second lets low-traffic upstreams retry too.
#[derive(Debug)]
pub struct RetryBudget {
    balance_milli: AtomicI64,
    last_refill_ms: AtomicU64,
    deposit_milli: i64,
    min_per_second: i64,
    cap_milli: i64,
    epoch: Instant,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        // at most ~10 s worth of the floor (or 100 retries) can be saved up; a fresh budget holds
        // one second's floor plus a few, so a cold gateway can still retry
        let cap_milli = (i64::from(min_per_second) * 10).max(100) * 1000;
        let initial_milli = (i64::from(min_per_second) + 10) * 1000;
        Self {
            balance_milli: AtomicI64::new(initial_milli.min(cap_milli)),
            last_refill_ms: AtomicU64::new(0),
            deposit_milli: i64::from(percent) * 10,
            min_per_second: i64::from(min_per_second),
            cap_milli,
            epoch: Instant::now(),
        }
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        if self.deposit_milli == 0 {
            return;
        }
        let previous = self
            .balance_milli
            .fetch_add(self.deposit_milli, Ordering::Relaxed);
        if previous + self.deposit_milli > self.cap_milli {
            self.balance_milli
                .fetch_min(self.cap_milli, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.refill();
        let previous = self.balance_milli.fetch_sub(1000, Ordering::Relaxed);
        if previous >= 1000 {
            true
        } else {
            self.balance_milli.fetch_add(1000, Ordering::Relaxed);
            false
        }
    }

    fn refill(&self) {
        if self.min_per_second == 0 {
            return;
        }
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_refill_ms.load(Ordering::Relaxed);
        if now_ms <= last {
            return;
        }
        if self
            .last_refill_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let add = (now_ms - last) as i64 * self.min_per_second;
            let previous = self.balance_milli.fetch_add(add, Ordering::Relaxed);
            if previous + add > self.cap_milli {
                self.balance_milli
                    .fetch_min(self.cap_milli, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_limits_retries_to_a_share_of_requests() {
        let budget = RetryBudget::new(20, 0);
        // starts with the burst allowance of 10 retries
        let burst = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(burst, 10);
        for _ in 0..100 {
            budget.deposit();
        }
        let allowed = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed, 20, "20% of 100 requests");
    }
}
