//! The in-memory response store: bounded by bytes, least recently used resources evicted first,
//! ordered by URL so that a purge by prefix is a range scan.

use std::{
    collections::BTreeMap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use super::entry::{Entry, VariantKey};

const SHARDS: usize = 16;

/// Gauges and counters the store keeps current (handles into the gateway's registry).
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub bytes: Gauge,
    pub entries: Gauge,
    pub evictions: Counter,
}

/// Responses kept in this process. Lives as long as the gateway (a reload keeps it).
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Bytes each shard may hold; the configured total divided by the shard count.
    shard_budget: AtomicU64,
    tick: AtomicU64,
    hasher: std::hash::RandomState,
    metrics: StoreMetrics,
}

#[derive(Debug, Default)]
struct Shard {
    resources: BTreeMap<Arc<str>, Resource>,
    /// Last use → URL: the first entry is the least recently used.
    recency: BTreeMap<u64, Arc<str>>,
    bytes: u64,
}

/// Every stored variant of one URL (identities, routes, `Vary` values).
#[derive(Debug, Default)]
struct Resource {
    variants: Vec<Arc<Entry>>,
    last_used: u64,
    bytes: u64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64, metrics: StoreMetrics) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_budget: AtomicU64::new(max_bytes / SHARDS as u64),
            tick: AtomicU64::new(1),
            hasher: std::hash::RandomState::new(),
            metrics,
        }
    }

    /// Changes the budget (a reload); shards over it shrink at their next insert.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.shard_budget
            .store(max_bytes / SHARDS as u64, Ordering::Relaxed);
    }

    /// The largest entry a shard can hold.
    pub fn max_entry_bytes(&self) -> u64 {
        self.shard_budget.load(Ordering::Relaxed)
    }

    fn shard(&self, url: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(url) as usize % SHARDS]
    }

    fn lock(&self, url: &str) -> std::sync::MutexGuard<'_, Shard> {
        self.shard(url)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The variant of `url` stored for `key`, marking the URL as used.
    pub fn get(&self, url: &str, key: &VariantKey<'_>) -> Option<Arc<Entry>> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.lock(url);
        let shard = &mut *shard;
        let resource = shard.resources.get_mut(url)?;
        let entry = resource.variants.iter().find(|e| e.matches(key))?.clone();
        if let Some(name) = shard.recency.remove(&resource.last_used) {
            shard.recency.insert(tick, name);
        }
        resource.last_used = tick;
        Some(entry)
    }

    /// Stores `entry` under `url`, replacing the variant it would be found by. Returns false when
    /// the entry alone exceeds what a shard may hold.
    pub fn put(&self, url: &str, entry: Arc<Entry>) -> bool {
        let size = entry.size();
        let budget = self.shard_budget.load(Ordering::Relaxed);
        if size > budget {
            return false;
        }
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.lock(url);
        let shard = &mut *shard;
        let (name, resource) = match shard.resources.get_key_value(url) {
            Some((name, _)) => {
                let name = name.clone();
                let resource = shard.resources.get_mut(url).expect("just found");
                (name, resource)
            }
            None => {
                let name: Arc<str> = url.into();
                self.metrics.entries.inc();
                let resource = shard.resources.entry(name.clone()).or_default();
                (name, resource)
            }
        };
        if let Some(index) = resource
            .variants
            .iter()
            .position(|e| e.same_variant(&entry))
        {
            let old = resource.variants.swap_remove(index);
            resource.bytes -= old.size();
            shard.bytes -= old.size();
            self.metrics.bytes.dec_by(old.size() as i64);
        }
        resource.variants.push(entry);
        resource.bytes += size;
        shard.bytes += size;
        self.metrics.bytes.inc_by(size as i64);
        shard.recency.remove(&resource.last_used);
        resource.last_used = tick;
        shard.recency.insert(tick, name.clone());
        // evict the least recently used URLs (never the one just stored) until within budget
        while shard.bytes > budget {
            let Some((&oldest, victim)) = shard.recency.iter().next() else {
                break;
            };
            if **victim == *url {
                break;
            }
            let victim = victim.clone();
            shard.recency.remove(&oldest);
            if let Some(evicted) = shard.resources.remove(&victim) {
                shard.bytes -= evicted.bytes;
                self.metrics.bytes.dec_by(evicted.bytes as i64);
                self.metrics.entries.dec();
                self.metrics.evictions.inc();
            }
        }
        true
    }

    /// Removes one stored variant (e.g. one that could not be revalidated).
    pub fn remove_variant(&self, url: &str, entry: &Entry) {
        let mut shard = self.lock(url);
        let shard = &mut *shard;
        let Some(resource) = shard.resources.get_mut(url) else {
            return;
        };
        if let Some(index) = resource.variants.iter().position(|e| e.same_variant(entry)) {
            let old = resource.variants.swap_remove(index);
            resource.bytes -= old.size();
            shard.bytes -= old.size();
            self.metrics.bytes.dec_by(old.size() as i64);
        }
        if resource.variants.is_empty() {
            let last_used = resource.last_used;
            shard.resources.remove(url);
            shard.recency.remove(&last_used);
            self.metrics.entries.dec();
        }
    }

    /// Removes every variant of URLs equal to `url`, or starting with it when `prefix`. Returns
    /// the number of URLs removed.
    pub fn purge(&self, url: &str, prefix: bool) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let shard = &mut *shard;
            let victims: Vec<Arc<str>> = if prefix {
                shard
                    .resources
                    .range::<str, _>((std::ops::Bound::Included(url), std::ops::Bound::Unbounded))
                    .take_while(|(name, _)| name.starts_with(url))
                    .map(|(name, _)| name.clone())
                    .collect()
            } else {
                shard
                    .resources
                    .get_key_value(url)
                    .map(|(name, _)| name.clone())
                    .into_iter()
                    .collect()
            };
            for victim in victims {
                if let Some(resource) = shard.resources.remove(&victim) {
                    shard.recency.remove(&resource.last_used);
                    shard.bytes -= resource.bytes;
                    self.metrics.bytes.dec_by(resource.bytes as i64);
                    self.metrics.entries.dec();
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Bytes held (all shards).
    pub fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .bytes
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::cache::control::Lifetime;

    fn entry(route: &str, identity: Option<&str>, body: usize) -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at: SystemTime::now(),
            lifetime: Lifetime {
                fresh_for: Duration::from_secs(60),
                stale_for: Duration::ZERO,
                revalidate: false,
                always_revalidate: false,
            },
            route: route.into(),
            identity: identity.map(Into::into),
            vary: Vec::new(),
        })
    }

    static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

    fn key<'a>(route: &'a str, identity: Option<&'a str>) -> VariantKey<'a> {
        VariantKey {
            route,
            identity,
            headers: &NO_HEADERS,
        }
    }

    #[test]
    fn variants_are_kept_apart_by_identity_and_route() {
        let store = MemoryStore::new(1 << 20, StoreMetrics::default());
        assert!(store.put("h/a", entry("r", Some("alice"), 10)));
        assert!(store.put("h/a", entry("r", Some("bob"), 20)));
        assert_eq!(
            store
                .get("h/a", &key("r", Some("alice")))
                .unwrap()
                .body
                .len(),
            10
        );
        assert_eq!(
            store.get("h/a", &key("r", Some("bob"))).unwrap().body.len(),
            20
        );
        assert!(store.get("h/a", &key("r", Some("carol"))).is_none());
        assert!(store.get("h/a", &key("r", None)).is_none());
        assert!(store.get("h/a", &key("other", Some("alice"))).is_none());
        // the same variant is replaced, not duplicated
        assert!(store.put("h/a", entry("r", Some("alice"), 30)));
        assert_eq!(
            store
                .get("h/a", &key("r", Some("alice")))
                .unwrap()
                .body
                .len(),
            30
        );
    }

    #[test]
    fn least_recently_used_urls_go_first_and_bytes_stay_bounded() {
        let metrics = StoreMetrics::default();
        // 16 shards of 4 KiB each
        let store = MemoryStore::new(64 * 1024, metrics.clone());
        for i in 0..400 {
            store.put(&format!("h/{i}"), entry("r", None, 1000));
            // keep one URL hot
            store.put("h/hot", entry("r", None, 1000));
            assert!(store.get("h/hot", &key("r", None)).is_some());
        }
        assert!(store.bytes() <= 64 * 1024, "bytes {}", store.bytes());
        assert!(metrics.evictions.get() > 300);
        assert_eq!(metrics.bytes.get() as u64, store.bytes());
        assert!(store.get("h/hot", &key("r", None)).is_some());
        assert!(store.get("h/0", &key("r", None)).is_none());
        // an entry larger than a shard is refused
        assert!(!store.put("h/big", entry("r", None, 5000)));
    }

    #[test]
    fn purge_by_url_and_prefix_removes_every_variant() {
        let store = MemoryStore::new(1 << 20, StoreMetrics::default());
        for url in ["h/users/1", "h/users/2", "h/users", "h/orders/1"] {
            store.put(url, entry("r", Some("alice"), 1));
            store.put(url, entry("r", Some("bob"), 1));
        }
        assert_eq!(store.purge("h/users", false), 1);
        assert!(store.get("h/users", &key("r", Some("bob"))).is_none());
        assert_eq!(store.purge("h/users/", true), 2);
        assert!(store.get("h/users/1", &key("r", Some("alice"))).is_none());
        assert!(store.get("h/orders/1", &key("r", Some("alice"))).is_some());
        assert_eq!(store.purge("", true), 1);
        assert_eq!(store.bytes(), 0);
    }
}
