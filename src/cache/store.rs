//! The in-memory response store: bounded by bytes, least recently used keys evicted first,
//! ordered by key (`URL␟ROUTE␟IDENTITY␟ORIGIN`) so that a purge by URL or URL prefix is a range
//! scan.

use std::{
    collections::BTreeMap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use super::entry::{Entry, VariantKey, KEY_SEPARATOR, MAX_VARIANTS_PER_KEY as MAX_VARIANTS};

const SHARDS: usize = 16;

/// Gauges and counters the store keeps current (handles into the gateway's registry).
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub bytes: Gauge,
    /// Stored responses (variants).
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
    keys: BTreeMap<Arc<str>, Variants>,
    /// Last use → key: the first entry is the least recently used.
    recency: BTreeMap<u64, Arc<str>>,
    bytes: u64,
}

/// The `Vary` variants stored under one key.
#[derive(Debug, Default)]
struct Variants {
    entries: Vec<Arc<Entry>>,
    last_used: u64,
    bytes: u64,
}

impl Shard {
    /// Removes a whole key; returns how many entries went.
    fn remove_key(&mut self, key: &str, metrics: &StoreMetrics) -> usize {
        let Some(variants) = self.keys.remove(key) else {
            return 0;
        };
        self.recency.remove(&variants.last_used);
        self.bytes -= variants.bytes;
        metrics.bytes.dec_by(variants.bytes as i64);
        metrics.entries.dec_by(variants.entries.len() as i64);
        variants.entries.len()
    }
}

impl Variants {
    fn take(&mut self, index: usize, shard_bytes: &mut u64, metrics: &StoreMetrics) {
        let old = self.entries.remove(index);
        self.bytes -= old.size();
        *shard_bytes -= old.size();
        metrics.bytes.dec_by(old.size() as i64);
        metrics.entries.dec();
    }
}

impl MemoryStore {
    /// A store of `max_bytes` at most, reporting to `metrics`.
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

    fn lock(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[self.hasher.hash_one(key) as usize % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The variant of `url` stored for `key`, marking its key as used.
    pub fn get(&self, url: &str, key: &VariantKey<'_>) -> Option<Arc<Entry>> {
        let store_key = key.store_key(url);
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.lock(&store_key);
        let shard = &mut *shard;
        let variants = shard.keys.get_mut(store_key.as_str())?;
        let entry = variants.entries.iter().find(|e| e.matches(key))?.clone();
        if let Some(name) = shard.recency.remove(&variants.last_used) {
            shard.recency.insert(tick, name);
        }
        variants.last_used = tick;
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
        let store_key = entry.store_key(url);
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.lock(&store_key);
        let shard = &mut *shard;
        let name: Arc<str> = match shard.keys.get_key_value(store_key.as_str()) {
            Some((name, _)) => name.clone(),
            None => store_key.into(),
        };
        let variants = shard.keys.entry(name.clone()).or_default();
        if let Some(index) = variants.entries.iter().position(|e| e.same_variant(&entry)) {
            variants.take(index, &mut shard.bytes, &self.metrics);
        }
        while variants.entries.len() >= MAX_VARIANTS {
            variants.take(0, &mut shard.bytes, &self.metrics);
        }
        variants.entries.push(entry);
        variants.bytes += size;
        shard.bytes += size;
        self.metrics.bytes.inc_by(size as i64);
        self.metrics.entries.inc();
        shard.recency.remove(&variants.last_used);
        variants.last_used = tick;
        shard.recency.insert(tick, name.clone());
        // evict the least recently used keys until within budget; if the key just written is
        // all that is left, its older variants go
        while shard.bytes > budget {
            let Some((&oldest, victim)) = shard.recency.iter().next() else {
                break;
            };
            if *victim == name {
                let Some(variants) = shard.keys.get_mut(&name) else {
                    break;
                };
                if variants.entries.len() <= 1 {
                    break;
                }
                variants.take(0, &mut shard.bytes, &self.metrics);
                self.metrics.evictions.inc();
                continue;
            }
            let victim = victim.clone();
            shard.recency.remove(&oldest);
            let evicted = shard.remove_key(&victim, &self.metrics);
            self.metrics.evictions.inc_by(evicted as u64);
        }
        true
    }

    /// Removes one stored variant (e.g. one that could not be revalidated).
    pub fn remove_variant(&self, url: &str, entry: &Entry) {
        let store_key = entry.store_key(url);
        let mut shard = self.lock(&store_key);
        let shard = &mut *shard;
        let Some(variants) = shard.keys.get_mut(store_key.as_str()) else {
            return;
        };
        if let Some(index) = variants.entries.iter().position(|e| e.same_variant(entry)) {
            variants.take(index, &mut shard.bytes, &self.metrics);
        }
        if variants.entries.is_empty() {
            shard.remove_key(&store_key, &self.metrics);
        }
    }

    /// Removes every entry of `url` (all routes, identities, origins, variants), or of every URL
    /// starting with it when `prefix`. Returns the number of URLs removed.
    pub fn purge(&self, url: &str, prefix: bool) -> usize {
        let mut exact = url.to_owned();
        exact.push(KEY_SEPARATOR);
        let start = if prefix { url } else { exact.as_str() };
        let mut urls = std::collections::BTreeSet::new();
        for shard in self.shards.iter() {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let victims: Vec<Arc<str>> = shard
                .keys
                .range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(start))
                .map(|(key, _)| key.clone())
                .collect();
            for victim in victims {
                if let Some((url, _)) = victim.split_once(KEY_SEPARATOR) {
                    urls.insert(url.to_owned());
                }
                shard.remove_key(&victim, &self.metrics);
            }
        }
        urls.len()
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
            origin: "http:".into(),
            vary: Vec::new(),
        })
    }

    static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

    fn key<'a>(route: &'a str, identity: Option<&'a str>) -> VariantKey<'a> {
        VariantKey {
            route,
            identity,
            origin: "http:",
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
    fn many_identities_of_one_url_are_evicted_one_by_one() {
        let metrics = StoreMetrics::default();
        let store = MemoryStore::new(64 * 1024, metrics.clone());
        for i in 0..1000 {
            assert!(store.put("h/me", entry("r", Some(&format!("user{i}")), 1000)));
        }
        assert!(store.bytes() <= 64 * 1024, "bytes {}", store.bytes());
        assert!(store.get("h/me", &key("r", Some("user999"))).is_some());
        assert!(store.get("h/me", &key("r", Some("user0"))).is_none());
        assert_eq!(
            metrics.entries.get() as u64 * entry("r", None, 1000).size(),
            store.bytes()
        );
    }

    #[test]
    fn variants_of_one_key_are_capped() {
        let store = MemoryStore::new(1 << 22, StoreMetrics::default());
        let mut headers = HeaderMap::new();
        for i in 0..20 {
            let mut e = (*entry("r", None, 10)).clone();
            e.vary = vec![(
                http::header::USER_AGENT,
                Some(format!("ua{i}").parse().unwrap()),
            )];
            store.put("h/a", Arc::new(e));
        }
        headers.insert(http::header::USER_AGENT, "ua19".parse().unwrap());
        let found = |headers: &HeaderMap| {
            store
                .get(
                    "h/a",
                    &VariantKey {
                        headers,
                        ..key("r", None)
                    },
                )
                .is_some()
        };
        assert!(found(&headers));
        headers.insert(http::header::USER_AGENT, "ua0".parse().unwrap());
        assert!(!found(&headers), "the oldest variants went");
        assert_eq!(
            store.bytes(),
            MAX_VARIANTS as u64 * entry("r", None, 10).size()
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
        assert_eq!(store.purge("h/users", false), 1, "one URL, two identities");
        assert!(store.get("h/users", &key("r", Some("bob"))).is_none());
        assert_eq!(store.purge("h/users/", true), 2);
        assert!(store.get("h/users/1", &key("r", Some("alice"))).is_none());
        assert!(store.get("h/orders/1", &key("r", Some("alice"))).is_some());
        assert_eq!(store.purge("", true), 1);
        assert_eq!(store.bytes(), 0);
    }
}
