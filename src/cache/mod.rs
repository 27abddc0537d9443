//! Response caching (RFC 9111, the parts a gateway needs), zero trust included: an entry made for
//! one identity is found only by that identity unless its route says `shared: true`.
//!
//! - [`control`]: `Cache-Control`, storability and freshness;
//! - [`entry`]: a stored response, the variant it answers, conditional requests;
//! - [`store`]: the in-process store (bounded by bytes, LRU), [`redis`] the shared one;
//! - [`Coalescer`]: concurrent misses for one variant wait for one upstream fetch.
//!
//! The request flow that uses them (lookup after the policies ran, fetch, store) is in
//! `proxy::caching`.

pub mod control;
pub mod entry;
pub mod redis;
pub mod store;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

pub use control::{Freshness, Lifetime, NotStorable};
pub use entry::{Entry, Standing, VariantKey};
pub use store::{MemoryStore, StoreMetrics};

/// The `x-cache` response header.
pub const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// What the cache did for a request (the `x-cache` header and the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache, fresh.
    Hit,
    /// Fetched from the upstream (and stored if it could be).
    Miss,
    /// Served stale while a background request refreshes it.
    Stale,
    /// Served from the cache after the upstream confirmed it (304).
    Revalidated,
    /// Not cacheable as asked (a method other than GET, a body, a `Range`), passed through.
    Bypass,
}

impl CacheStatus {
    pub const ALL: [Self; 5] = [
        Self::Hit,
        Self::Miss,
        Self::Stale,
        Self::Revalidated,
        Self::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Revalidated => "revalidated",
            Self::Bypass => "bypass",
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// Where a route's entries live.
#[derive(Debug, Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
    Redis(Arc<redis::RedisStore>),
}

impl Store {
    pub async fn get(&self, url: &str, key: &VariantKey<'_>) -> Option<Arc<Entry>> {
        match self {
            Self::Memory(store) => store.get(url, key),
            Self::Redis(store) => store.get(url, key).await,
        }
    }

    pub async fn put(&self, url: &str, entry: Arc<Entry>) {
        match self {
            Self::Memory(store) => {
                store.put(url, entry);
            }
            Self::Redis(store) => store.put(url, &entry).await,
        }
    }

    /// Removes every entry of `url` (all routes, identities, variants), or of every URL that
    /// starts with it when `prefix`. Returns how many URLs went.
    pub async fn purge(&self, url: &str, prefix: bool) -> Result<usize, redis::PurgeError> {
        match self {
            Self::Memory(store) => Ok(store.purge(url, prefix)),
            Self::Redis(store) => store.purge(url, prefix).await,
        }
    }

    pub async fn remove_variant(&self, url: &str, entry: &Entry) {
        match self {
            Self::Memory(store) => store.remove_variant(url, entry),
            Self::Redis(store) => store.remove_variant(url, entry).await,
        }
    }
}

/// A route's cache settings and handles, compiled from its `cache` section.
#[derive(Debug)]
pub struct RouteCache {
    pub freshness: Freshness,
    /// Entries serve every identity (otherwise each identity has its own).
    pub shared: bool,
    pub max_entry_bytes: u64,
    pub store: Store,
    pub coalescer: Arc<Coalescer>,
    /// Lookups by [`CacheStatus`], in [`CacheStatus::ALL`] order.
    pub outcomes: [Counter; 5],
}

impl RouteCache {
    /// Counts a lookup's outcome (the metric; the access log reads `RequestCtx::cache`).
    pub fn count(&self, status: CacheStatus) {
        let index = CacheStatus::ALL
            .iter()
            .position(|s| *s == status)
            .unwrap_or(0);
        self.outcomes[index].inc();
    }

    /// The identity an entry is kept for: `None` on shared routes and for anonymous requests.
    pub fn identity_of(
        &self,
        identity: Option<&crate::policy::authn::Identity>,
    ) -> Option<Box<str>> {
        if self.shared {
            return None;
        }
        identity.map(|i| {
            // method and provider too: an API key named `alice` is not the JWT subject `alice`
            format!("{}:{}:{}", i.method, i.provider, i.subject).into_boxed_str()
        })
    }
}

/// Lets one request fetch what several concurrent requests miss; the others wait for it and
/// then look the cache up again.
#[derive(Debug, Default)]
pub struct Coalescer {
    in_flight: Mutex<HashMap<Box<str>, watch::Receiver<()>>>,
}

/// A request's turn for one variant: fetch it, or wait for the request that does.
pub enum Turn {
    Lead(FetchGuard),
    Follow(watch::Receiver<()>),
}

/// Held by the request that fetches; dropping it (fetch done, or the request abandoned) wakes the
/// followers.
pub struct FetchGuard {
    coalescer: Arc<Coalescer>,
    key: Box<str>,
    _done: watch::Sender<()>,
}

impl Coalescer {
    /// Joins the fetch of `key` (URL, route and identity), or leads it when none is running.
    pub fn join(self: &Arc<Self>, key: Box<str>) -> Turn {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(receiver) = in_flight.get(&key) {
            return Turn::Follow(receiver.clone());
        }
        let (done, receiver) = watch::channel(());
        in_flight.insert(key.clone(), receiver);
        Turn::Lead(FetchGuard {
            coalescer: self.clone(),
            key,
            _done: done,
        })
    }

    /// Whether a fetch of `key` is running (a stale hit then starts no second refresh).
    pub fn is_fetching(&self, key: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(key)
    }
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        self.coalescer
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
        // `_done` drops after this: followers wake to a key that is free again
    }
}

/// Waits until the leader of a fetch is done, at most `timeout`.
pub async fn follow(mut receiver: watch::Receiver<()>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, receiver.changed()).await;
}

/// A cache URL (`HOST/PATH?QUERY`) with its host lowercased, as entries are stored (hosts are
/// case-insensitive, paths are not).
pub fn lowercase_host(url: &str) -> String {
    let split = url.find('/').unwrap_or(url.len());
    let (host, rest) = url.split_at(split);
    let mut normalised = host.to_ascii_lowercase();
    normalised.push_str(rest);
    normalised
}

/// The coalescing key of a variant lookup.
pub fn fetch_key(url: &str, route: &str, identity: Option<&str>) -> Box<str> {
    let mut key = String::with_capacity(url.len() + route.len() + 32);
    key.push_str(route);
    key.push('\n');
    key.push_str(identity.unwrap_or(""));
    key.push('\n');
    key.push_str(url);
    key.into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_per_key_and_followers_wake_when_it_is_done() {
        let coalescer = Arc::new(Coalescer::default());
        let Turn::Lead(guard) = coalescer.join("k".into()) else {
            panic!("first is the leader");
        };
        let Turn::Follow(receiver) = coalescer.join("k".into()) else {
            panic!("second follows");
        };
        assert!(matches!(coalescer.join("other".into()), Turn::Lead(_)));
        let waiter = tokio::spawn(follow(receiver, Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("follower woke")
            .unwrap();
        assert!(!coalescer.is_fetching("k"));
        assert!(matches!(coalescer.join("k".into()), Turn::Lead(_)));
    }
}
