//! `redis_mode: fast`: every decision is local and no request waits on Redis. Each replica counts
//! the requests it allowed per key and, every `sync_interval`, adds them to the key's shared TAT
//! in Redis with one script call for all keys, then takes the shared TAT (which includes every
//! replica's requests) as its own when it is further ahead.
//!
//! The price is a bounded overshoot. Between two syncs a replica knows nothing of the others'
//! requests, so it spends only its share of what is left. A key this replica has not synced
//! recently is *cold*: it gets this replica's share (1/N) of the limit, in a bucket of its own.
//! Each sync counts every allowed request in Redis at the whole limit's interval (the shared
//! state never undercounts) and brings back how much of the limit is left; the key is then
//! *warm*, and the replica may spend 1/N of what is left until the next sync. In steady state
//! every replica does the same, so the sum stays within the limit but for the refill during one
//! sync interval and rounding: an overshoot of at most about (N − 1) × (1 + rate ×
//! sync_interval) requests. The worst case is a key that turns hot at every replica at once:
//! the cold shares add up to the burst before the first syncs, and each replica's first warm
//! share misses the others' unsynced requests, adding up to (N − 1)/N × burst more.
//! docs/rate-limiting.md has measurements. When Redis cannot be reached, replicas keep
//! deciding locally, each on its share of the limits (`fail_open`), or refuse (`fail_closed`).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use super::{
    gcra::Limit,
    local::{now_ns, LocalBuckets},
    rule::shared_name,
};
use crate::{config::model::StoreFailure, store::RedisStore};

/// Adds each key's count (ARGV[2i-1] interval µs, ARGV[2i] count) to its TAT and returns how
/// far each TAT now runs ahead of the server clock (µs). Keys expire once fully recovered.
const SYNC: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local result = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local count = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tat = tat + interval * count
  redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  result[i] = tat - now
end
return result
"#;

/// Marks the bucket of a cold key apart from the key's warm bucket.
const COLD: u64 = 0x9e37_79b9_7f4a_7c15;

/// Requests allowed locally since the last sync, per shared key.
#[derive(Debug, Clone, Copy)]
struct Pending {
    local_key: u64,
    limit: Limit,
    count: u64,
}

/// The fast-mode state of one config generation.
pub struct FastSync {
    store: Arc<RedisStore>,
    buckets: Arc<LocalBuckets>,
    script: redis::Script,
    pending: Mutex<HashMap<[u8; 16], Pending>>,
    pub interval: Duration,
    pub on_error: StoreFailure,
    /// This replica's share of each limit while Redis is unreachable.
    pub share: f64,
    /// The last sync reached Redis.
    healthy: AtomicBool,
    /// Local keys whose shared state the last sync brought (they decide on the whole limit).
    warm: Mutex<std::collections::HashSet<u64>>,
    pub failures: AtomicU64,
    /// Request phases decided by `on_store_error` (Redis unreachable).
    pub fallbacks: AtomicU64,
    pub syncs: AtomicU64,
    /// Bumped each time the pending counts are taken for a sync (a count taken cannot be
    /// taken back any more).
    drains: AtomicU64,
}

impl std::fmt::Debug for FastSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastSync")
            .field("interval", &self.interval)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl FastSync {
    pub fn new(
        store: Arc<RedisStore>,
        buckets: Arc<LocalBuckets>,
        interval: Duration,
        on_error: StoreFailure,
        replicas: u32,
    ) -> Self {
        Self {
            store,
            buckets,
            script: redis::Script::new(SYNC),
            pending: Mutex::default(),
            interval,
            on_error,
            share: 1.0 / f64::from(replicas.max(1)),
            healthy: AtomicBool::new(true),
            warm: Mutex::default(),
            failures: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            drains: AtomicU64::new(0),
        }
    }

    /// Whether the last sync reached Redis (until it fails, replicas share the limits).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The local key for a shared digest (the same bucket whatever the process' hash key).
    pub fn local_key(digest: &[u8; 16]) -> u64 {
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    /// The local bucket and limit to decide `key` on: the key's own bucket and the whole limit
    /// once a sync brought its shared state (warm), else a separate bucket with this replica's
    /// share of the limit (cold: what the others allowed is unknown).
    pub fn bucket_for(&self, key: u64, limit: Limit) -> (u64, Limit) {
        let warm = self
            .warm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key);
        if warm {
            (key, limit)
        } else {
            (key ^ COLD, limit.scaled(self.share))
        }
    }

    /// Counts one locally allowed request towards the next sync; returns the drain generation
    /// to give to [`uncount`](Self::uncount).
    pub fn count(&self, digest: [u8; 16], limit: &Limit) -> u64 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.drains.load(Ordering::Relaxed);
        pending
            .entry(digest)
            .or_insert(Pending {
                local_key: Self::local_key(&digest),
                limit: *limit,
                count: 0,
            })
            .count += 1;
        generation
    }

    /// Takes back a counted request (a later rule refused it), unless its count already went
    /// to Redis (then it stays counted: the shared state never undercounts).
    pub fn uncount(&self, digest: &[u8; 16], generation: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if self.drains.load(Ordering::Relaxed) != generation {
            return;
        }
        if let Some(entry) = pending.get_mut(digest) {
            entry.count = entry.count.saturating_sub(1);
        }
    }

    /// One sync: pushes the counts, pulls the shared TATs. Counts that could not be pushed are
    /// dropped (Redis was unreachable; they stay in the local state).
    pub async fn sync_once(&self) -> Result<usize, crate::store::StoreError> {
        let batch: Vec<([u8; 16], Pending)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.drains.fetch_add(1, Ordering::Relaxed);
            pending.drain().filter(|(_, p)| p.count > 0).collect()
        };
        if batch.is_empty() {
            // nothing to push: still find out whether Redis is there, so that `on_error` applies
            // while it is not, also to a replica that is only refusing
            let ping: Result<String, _> = self.store.query(&redis::cmd("PING")).await;
            return self.record_health(ping.map(|_| 0));
        }
        let entries: Vec<(String, u64)> = batch
            .iter()
            .map(|(digest, pending)| (self.store.key(&shared_name(digest)), pending.count))
            .collect();
        // one script call per cluster slot (one in all on a standalone server)
        let mut aheads = vec![0i64; batch.len()];
        for group in super::shared::slot_groups(&self.store, &entries) {
            let keys: Vec<String> = group.iter().map(|&i| entries[i].0.clone()).collect();
            let mut args = Vec::with_capacity(group.len() * 2);
            for &i in &group {
                args.push((batch[i].1.limit.interval / 1_000).max(1));
                args.push(batch[i].1.count);
            }
            let result: Result<Vec<i64>, _> =
                self.store.run_script(&self.script, &keys, &args).await;
            let group_aheads = self.record_health(result)?;
            for (&i, ahead) in group.iter().zip(group_aheads) {
                aheads[i] = ahead;
            }
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let now = now_ns();
        let mut warm = std::collections::HashSet::with_capacity(batch.len());
        for ((_, pending), ahead_us) in batch.iter().zip(aheads) {
            let ahead = u64::try_from(ahead_us).unwrap_or(0) * 1_000;
            // this replica may spend its share of what is left until the next sync: every
            // replica doing the same keeps the sum within the limit
            let full = pending.limit.tolerance + pending.limit.interval;
            let local_ahead = match full.checked_sub(ahead) {
                Some(left) => full - (left as f64 * self.share) as u64,
                None => ahead,
            };
            self.buckets.raise(pending.local_key, now + local_ahead);
            warm.insert(pending.local_key);
        }
        *self.warm.lock().unwrap_or_else(|e| e.into_inner()) = warm;
        Ok(batch.len())
    }

    /// Notes whether Redis answered, logging only the changes.
    fn record_health<T>(
        &self,
        result: Result<T, crate::store::StoreError>,
    ) -> Result<T, crate::store::StoreError> {
        match result {
            Ok(value) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("rate limits sync with Redis again");
                }
                Ok(value)
            }
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, on_error = ?self.on_error, "rate limits cannot sync with Redis");
                }
                Err(error)
            }
        }
    }
}

/// The background task that syncs every `interval`; stopped when dropped (at reload, a new one
/// starts for the new generation).
#[derive(Debug, Default)]
pub struct FastSyncTask {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FastSyncTask {
    /// Call inside a runtime. Does nothing without fast mode.
    pub fn start(sync: Option<Arc<FastSync>>) -> Self {
        let task = sync.map(|sync| {
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(sync.interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let _ = sync.sync_once().await;
                }
            })
        });
        Self { task }
    }
}

impl Drop for FastSyncTask {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
