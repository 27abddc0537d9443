//! Load balancing: weighted round robin, least request (power of two choices) and consistent
//! hashing. Every pick skips targets that are unhealthy or ejected.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Target;

/// A compiled balancing policy over an upstream's targets (indices into its target list).
#[derive(Debug)]
pub enum Balancer {
    /// Targets repeated by weight and interleaved, walked by a shared counter.
    RoundRobin {
        order: Box<[usize]>,
        next: AtomicUsize,
    },
    /// Two random candidates; the one with fewer requests in flight per unit of weight wins.
    LeastRequest,
    /// Points on a hash ring (`weight × 100` per target), sorted by hash.
    ConsistentHash { ring: Box<[(u64, usize)]> },
}

impl Balancer {
    pub fn round_robin(targets: &[Target]) -> Self {
        // interleave by weight: smooth weighted round robin over one full cycle
        let total: i64 = targets.iter().map(|t| i64::from(t.weight)).sum();
        let mut current = vec![0i64; targets.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, target) in targets.iter().enumerate() {
                current[i] += i64::from(target.weight);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            order.push(best);
        }
        Self::RoundRobin {
            order: order.into(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn consistent_hash(targets: &[Target]) -> Self {
        let mut ring = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            for point in 0..target.weight * 100 {
                ring.push((fnv1a(format!("{}#{point}", target.label).as_bytes()), i));
            }
        }
        ring.sort_unstable();
        Self::ConsistentHash { ring: ring.into() }
    }

    /// Picks an available target, avoiding `exclude` (the one a retry is moving away from) when
    /// another is available. `hash_key` is used only by consistent hashing.
    pub fn pick(
        &self,
        targets: &[Target],
        exclude: Option<usize>,
        hash_key: Option<&[u8]>,
        now_ms: u64,
    ) -> Option<usize> {
        let usable = |i: usize| targets[i].is_available(now_ms) && Some(i) != exclude;
        let picked = match self {
            Self::RoundRobin { order, next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..order.len())
                    .map(|k| order[(start + k) % order.len()])
                    .find(|&i| usable(i))
            }
            Self::LeastRequest => pick_least_request(targets, &usable),
            Self::ConsistentHash { ring } => match hash_key {
                None => {
                    // no key in this request: spread by a random start on the ring
                    let start = fastrand::usize(..ring.len().max(1));
                    (0..ring.len())
                        .map(|k| ring[(start + k) % ring.len()].1)
                        .find(|&i| usable(i))
                }
                Some(key) => {
                    let hash = fnv1a(key);
                    let start = ring.partition_point(|(point, _)| *point < hash);
                    (0..ring.len())
                        .map(|k| ring[(start + k) % ring.len()].1)
                        .find(|&i| usable(i))
                }
            },
        };
        // a retry with nowhere else to go may return to the excluded target if it is still available
        picked.or_else(|| exclude.filter(|&i| targets[i].is_available(now_ms)))
    }
}

fn pick_least_request(targets: &[Target], usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    let n = targets.len();
    let load =
        |i: usize| u64::from(targets[i].in_flight()) * 1000 / u64::from(targets[i].weight.max(1));
    if n >= 2 {
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        match (usable(a), usable(b)) {
            (true, true) => return Some(if load(b) < load(a) { b } else { a }),
            (true, false) => return Some(a),
            (false, true) => return Some(b),
            (false, false) => {}
        }
    }
    (0..n).filter(|&i| usable(i)).min_by_key(|&i| load(i))
}

/// FNV-1a with a final avalanche step: a stable (same in every process and replica)
/// non-cryptographic hash, so similar keys (`user-1`, `user-2`) land far apart on the ring.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // MurmurHash3's 64-bit finaliser
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::test_targets;

    #[test]
    fn round_robin_follows_weights_and_interleaves() {
        let targets = test_targets(&[3, 1]);
        let balancer = Balancer::round_robin(&targets);
        let picks: Vec<usize> = (0..8)
            .map(|_| balancer.pick(&targets, None, None, 0).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 2);
        assert_ne!(
            &picks[..3],
            &[0, 0, 0],
            "weights are interleaved, not bunched: {picks:?}"
        );
    }

    #[test]
    fn unavailable_targets_are_skipped_and_excluded_ones_avoided() {
        let targets = test_targets(&[1, 1, 1]);
        targets[1].state.set_healthy(false);
        let balancer = Balancer::round_robin(&targets);
        for _ in 0..10 {
            assert_ne!(balancer.pick(&targets, None, None, 0), Some(1));
            assert_ne!(balancer.pick(&targets, Some(0), None, 0), Some(0));
        }
        targets[0].state.set_healthy(false);
        targets[2].state.set_healthy(false);
        assert_eq!(balancer.pick(&targets, None, None, 0), None);
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_when_a_target_is_down() {
        let targets = test_targets(&[1, 1, 1, 1]);
        let balancer = Balancer::consistent_hash(&targets);
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| {
                balancer
                    .pick(&targets, None, Some(k.as_bytes()), 0)
                    .unwrap()
            })
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| {
                balancer
                    .pick(&targets, None, Some(k.as_bytes()), 0)
                    .unwrap()
            })
            .collect();
        assert_eq!(before, again);
        assert!(
            (0..4).all(|t| before.contains(&t)),
            "keys spread over all targets"
        );
        targets[2].state.set_healthy(false);
        for (key, &was) in keys.iter().zip(&before) {
            let now = balancer
                .pick(&targets, None, Some(key.as_bytes()), 0)
                .unwrap();
            if was != 2 {
                assert_eq!(now, was, "keys on healthy targets stay put");
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    #[test]
    fn least_request_prefers_the_idle_target() {
        let targets = test_targets(&[1, 1]);
        for _ in 0..5 {
            targets[0].state.begin_request();
        }
        for _ in 0..20 {
            assert_eq!(pick_least_request(&targets, &|_| true), Some(1));
        }
    }
}
