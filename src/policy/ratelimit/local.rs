//! The in-process store: one TAT per key, in mutex-guarded shards shared by every worker thread,
//! bounded in size. GCRA makes eviction safe: a key whose TAT has passed holds no information, so
//! those go first; only a store full of keys that are all still limited loses state (counted).

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    time::Instant,
};

use super::gcra::{Limit, Verdict};

const SHARDS: usize = 64;

/// Keys are already 64-bit keyed hashes: the maps use them as they are instead of hashing them
/// again.
#[derive(Default, Clone, Copy)]
pub struct PrehashedKey(u64);

impl std::hash::Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // only u64 keys are hashed with this; fold anything else in all the same
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type Shard = HashMap<u64, u64, std::hash::BuildHasherDefault<PrehashedKey>>;

/// Buckets of every rule, keyed by a 64-bit keyed hash of (rule, key parts). The hash key is
/// random per process, so clients cannot aim collisions at each other.
#[derive(Debug)]
pub struct LocalBuckets {
    shards: Box<[Mutex<Shard>]>,
    per_shard: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
    /// Keys dropped while still limited (the store was full of active keys).
    pub evicted_active: AtomicU64,
}

impl Default for LocalBuckets {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl LocalBuckets {
    pub fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: AtomicUsize::new(max_keys.div_ceil(SHARDS).max(1)),
            hasher: Default::default(),
            evicted_active: AtomicU64::new(0),
        }
    }

    /// Applies a reloaded `max_keys` (the buckets themselves survive reloads).
    pub fn set_max_keys(&self, max_keys: usize) {
        self.per_shard
            .store(max_keys.div_ceil(SHARDS).max(1), Ordering::Relaxed);
    }

    pub fn hasher(&self) -> &impl BuildHasher {
        &self.hasher
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(key >> 58) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and, when allowed, records one request for `key` under `limit`.
    pub fn check(&self, key: u64, limit: &Limit, now: u64) -> Verdict {
        let mut shard = self.shard(key);
        let tat = shard.get(&key).copied().unwrap_or(0);
        let verdict = limit.check(tat, now);
        if verdict.allowed {
            let per_shard = self.per_shard.load(Ordering::Relaxed);
            if shard.len() >= per_shard && !shard.contains_key(&key) {
                shard.retain(|_, tat| *tat > now);
                if shard.len() * 8 >= per_shard * 7 {
                    // still (nearly) full of keys that are all limited: forget an eighth of
                    // them at once (they get a fresh allowance; the count makes this visible),
                    // so that one sweep serves many inserts
                    let excess = shard.len() - per_shard * 7 / 8 + 1;
                    let victims: Vec<u64> = shard.keys().take(excess).copied().collect();
                    for victim in &victims {
                        shard.remove(victim);
                    }
                    self.evicted_active
                        .fetch_add(victims.len() as u64, Ordering::Relaxed);
                }
            }
            shard.insert(key, verdict.tat);
        }
        verdict
    }

    /// Moves a key's TAT forward to `tat` if it is behind (what other replicas allowed, learnt
    /// from a shared store).
    pub fn raise(&self, key: u64, tat: u64) {
        let mut shard = self.shard(key);
        let entry = shard.entry(key).or_insert(0);
        if *entry < tat {
            *entry = tat;
        }
    }

    /// Takes back one request recorded by [`check`](Self::check) (a later rule refused it).
    pub fn refund(&self, key: u64, limit: &Limit) {
        if let Some(tat) = self.shard(key).get_mut(&key) {
            *tat = tat.saturating_sub(limit.interval);
        }
    }

    /// Keys held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Nanoseconds on a monotonic clock shared by the process (0 at first use).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // start at one second so that a fresh key (TAT 0) is always in the past
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_workers_share_one_exact_count() {
        let buckets = std::sync::Arc::new(LocalBuckets::new(1_000));
        // 50 per hour with burst 50: exactly 50 of 400 concurrent requests pass
        let limit = Limit::new(50, 3_600_000_000_000, 50);
        let now = now_ns();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let buckets = buckets.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| buckets.check(7, &limit, now).allowed)
                        .count()
                })
            })
            .collect();
        let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(allowed, 50);
    }

    #[test]
    fn the_store_stays_bounded_and_drops_idle_keys_first() {
        let buckets = LocalBuckets::new(SHARDS * 4);
        let limit = Limit::new(1, 1_000_000_000, 1);
        let now = now_ns();
        for key in 0..10_000u64 {
            buckets.check(key.wrapping_mul(0x9e37_79b9_7f4a_7c15), &limit, now);
        }
        assert!(buckets.len() <= SHARDS * 4, "{}", buckets.len());
        assert!(buckets.evicted_active.load(Ordering::Relaxed) > 0);
        // two seconds later every key is idle: new keys replace them without losing anything
        let before = buckets.evicted_active.load(Ordering::Relaxed);
        for key in 0..10u64 {
            buckets.check(key << 60 | 1, &limit, now + 2_000_000_000);
        }
        assert_eq!(buckets.evicted_active.load(Ordering::Relaxed), before);
    }
}
