//! Limits shared by every replica through Redis (`store: redis`): one atomic Lua script per
//! request phase checks all the phase's rules against the server's clock and records the request
//! only if every rule allows it, so N replicas enforce one limit exactly.
//!
//! TATs are kept in whole microseconds (Lua numbers are doubles, exact to 2^53; they are
//! written with `%.0f`, as `tostring` would round them to 14 digits, i.e. to 100 µs). Each key expires when
//! its limit has fully recovered, so Redis holds only keys that still carry information.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use super::{gcra::Limit, local::now_ns, rule::Rule};
use crate::{
    config::model::StoreFailure,
    store::{RedisStore, StoreError},
};

/// Checks every key (KEYS[i], with ARGV[2i-1] = interval µs, ARGV[2i] = tolerance µs); returns
/// `{1, ahead_1, ..., ahead_n}` (allowed: each key's new TAT minus now) or `{0, i, retry, ahead}`
/// (refused by key i).
const CHECK: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  if tat - now > tolerance then
    return {0, i, tat - now - tolerance, tat - now}
  end
  tats[i] = tat + interval
end
local result = {1}
for i = 1, #KEYS do
  local ahead = tats[i] - now
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.floor(ahead / 1000) + 1)
  result[i + 1] = ahead
end
return result
"#;

/// Takes one request back from each key (ARGV[i] = interval µs).
const REFUND: &str = r#"
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > 0 then
    redis.call('SET', KEYS[i], string.format('%.0f', tat - tonumber(ARGV[i])), 'KEEPTTL')
  end
end
return 1
"#;

/// The shared store and what to do when it fails.
pub struct SharedLimiter {
    store: Arc<RedisStore>,
    check: redis::Script,
    refund: redis::Script,
    pub on_error: StoreFailure,
    /// Under `fail_open`, this replica's share of each limit.
    pub share: f64,
    /// Decisions Redis could not make (errors and timeouts).
    pub errors: AtomicU64,
    /// Request phases decided by `on_store_error` (Redis unreachable).
    pub fallbacks: AtomicU64,
    last_warning: AtomicU64,
    /// After a failure Redis is not asked again until then (ns, monotonic), so that requests
    /// do not each wait out the timeout while it is down; one request probes it at a time.
    retry_at: AtomicU64,
    /// How long a failure keeps Redis out.
    backoff: Duration,
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimiter")
            .field("on_error", &self.on_error)
            .field("share", &self.share)
            .finish()
    }
}

/// What the shared store decided for a phase.
#[derive(Debug)]
pub enum SharedVerdict {
    /// Every rule allowed; per rule, how far its TAT now runs ahead (ns).
    Allowed(Vec<u64>),
    /// Rule `index` refused.
    Refused {
        index: usize,
        retry_after_ns: u64,
        reset_after_ns: u64,
    },
}

impl SharedLimiter {
    pub fn new(
        store: Arc<RedisStore>,
        on_error: StoreFailure,
        replicas: u32,
        backoff: Duration,
    ) -> Self {
        Self {
            retry_at: AtomicU64::new(0),
            backoff,
            store,
            check: redis::Script::new(CHECK),
            refund: redis::Script::new(REFUND),
            on_error,
            share: 1.0 / f64::from(replicas.max(1)),
            errors: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            last_warning: AtomicU64::new(0),
        }
    }

    /// Checks and records one request against `keys` (names from [`Rule::shared_key`], each
    /// with the limit to apply, adaptive multiplier included).
    pub async fn check(
        &self,
        keys: &[(String, Arc<Rule>, Limit)],
    ) -> Result<SharedVerdict, StoreError> {
        self.admit()?;
        let entries: Vec<(String, Limit)> = keys
            .iter()
            .map(|(name, _, limit)| (self.store.key(name), *limit))
            .collect();
        let groups = slot_groups(&self.store, &entries);
        if groups.len() == 1 {
            return self.check_group(&entries).await;
        }
        // a cluster: one script per slot; a refusal or failure in one group gives back what
        // the groups before it counted (each key stays atomic, the request as a whole nearly so)
        let mut aheads = vec![0; entries.len()];
        let mut counted: Vec<(String, Limit)> = Vec::new();
        for group in &groups {
            let subset: Vec<(String, Limit)> = group.iter().map(|&i| entries[i].clone()).collect();
            match self.check_group(&subset).await {
                Ok(SharedVerdict::Allowed(group_aheads)) => {
                    for (&i, ahead) in group.iter().zip(group_aheads) {
                        aheads[i] = ahead;
                    }
                    counted.extend(subset);
                }
                Ok(SharedVerdict::Refused {
                    index,
                    retry_after_ns,
                    reset_after_ns,
                }) => {
                    self.refund_entries(&counted).await;
                    return Ok(SharedVerdict::Refused {
                        index: group.get(index).copied().unwrap_or(0),
                        retry_after_ns,
                        reset_after_ns,
                    });
                }
                Err(error) => {
                    self.refund_entries(&counted).await;
                    return Err(error);
                }
            }
        }
        Ok(SharedVerdict::Allowed(aheads))
    }

    /// One script call for keys (full names) that share a slot.
    async fn check_group(&self, entries: &[(String, Limit)]) -> Result<SharedVerdict, StoreError> {
        let names: Vec<String> = entries.iter().map(|(name, _)| name.clone()).collect();
        let mut args = Vec::with_capacity(entries.len() * 2);
        for (_, limit) in entries {
            args.push((limit.interval / 1_000).max(1));
            args.push(limit.tolerance / 1_000);
        }
        let reply: Vec<i64> = self
            .store
            .run_script(&self.check, &names, &args)
            .await
            .inspect_err(|error| self.failed(error))?;
        self.retry_at.store(0, Ordering::Relaxed);
        let micros = |v: Option<&i64>| u64::try_from(*v.unwrap_or(&0)).unwrap_or(0) * 1_000;
        match reply.first() {
            Some(1) => Ok(SharedVerdict::Allowed(
                reply[1..].iter().map(|v| micros(Some(v))).collect(),
            )),
            Some(0) => Ok(SharedVerdict::Refused {
                index: usize::try_from(reply.get(1).copied().unwrap_or(1) - 1).unwrap_or(0),
                retry_after_ns: micros(reply.get(2)),
                reset_after_ns: micros(reply.get(3)),
            }),
            _ => Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected rate-limit script reply",
            )))),
        }
    }

    /// Whether Redis may be asked now: not while a failure's back-off runs; when it ends, this
    /// caller alone probes (the others keep failing fast until the probe answers).
    fn admit(&self) -> Result<(), StoreError> {
        let now = now_ns();
        let retry_at = self.retry_at.load(Ordering::Relaxed);
        if retry_at == 0 {
            return Ok(());
        }
        let probe_until = now + self.backoff.as_nanos() as u64;
        if now >= retry_at
            && self
                .retry_at
                .compare_exchange(retry_at, probe_until, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Ok(());
        }
        Err(StoreError::Unavailable)
    }

    /// Takes one request back from `keys` (a later phase refused the request).
    pub async fn refund(&self, keys: &[(String, Arc<Rule>, Limit)]) {
        let entries: Vec<(String, Limit)> = keys
            .iter()
            .map(|(name, _, limit)| (self.store.key(name), *limit))
            .collect();
        self.refund_entries(&entries).await;
    }

    /// Takes one request back from keys (full names), one script call per slot.
    async fn refund_entries(&self, entries: &[(String, Limit)]) {
        if entries.is_empty() || self.retry_at.load(Ordering::Relaxed) != 0 {
            return; // nothing counted, or Redis is out: nothing was counted there since
        }
        for group in slot_groups(&self.store, entries) {
            let names: Vec<String> = group.iter().map(|&i| entries[i].0.clone()).collect();
            let args: Vec<u64> = group
                .iter()
                .map(|&i| (entries[i].1.interval / 1_000).max(1))
                .collect();
            if let Err(error) = self
                .store
                .run_script::<i64, u64>(&self.refund, &names, &args)
                .await
            {
                self.failed(&error);
                return;
            }
        }
    }

    /// Counts a failure, keeps Redis out for the back-off, and warns at most once a second (a
    /// down Redis must not flood the log).
    fn failed(&self, error: &StoreError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = now_ns();
        self.retry_at
            .store(now + self.backoff.as_nanos() as u64, Ordering::Relaxed);
        let last = self.last_warning.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= Duration::from_secs(1).as_nanos() as u64
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %error,
                on_error = ?self.on_error,
                failures = self.errors.load(Ordering::Relaxed),
                "rate limits could not reach Redis"
            );
        }
    }
}

/// Indices of `entries` grouped by cluster slot, in order of first appearance (one group on a
/// standalone server).
pub(super) fn slot_groups<T>(store: &RedisStore, entries: &[(String, T)]) -> Vec<Vec<usize>> {
    if !store.is_cluster() {
        return vec![(0..entries.len()).collect()];
    }
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, (name, _)) in entries.iter().enumerate() {
        let slot = crate::store::slot(name);
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, group)) => group.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}
