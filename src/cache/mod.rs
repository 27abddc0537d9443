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
    /// Every status, in declaration order (the order of [`RouteCache::outcomes`]).
    pub const ALL: [Self; 5] = [
        Self::Hit,
        Self::Miss,
        Self::Stale,
        Self::Revalidated,
        Self::Bypass,
    ];

    /// The `x-cache` value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Revalidated => "revalidated",
            Self::Bypass => "bypass",
        }
    }

    /// [`Self::as_str`] as a header value.
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
    /// The variant of `url` that `key` selects.
    pub async fn get(&self, url: &str, key: &VariantKey<'_>) -> Option<Arc<Entry>> {
        match self {
            Self::Memory(store) => store.get(url, key),
            Self::Redis(store) => store.get(url, key).await,
        }
    }

    /// Stores `entry` under `url`, replacing the variant it would be found by.
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

    /// Removes the variant `entry` is (one that may no longer be served).
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
    /// The largest body stored (`cache.max_entry_size`).
    pub max_entry_bytes: u64,
    /// Where entries live (`cache.store`).
    pub store: Store,
    /// The process's fetches in flight, shared by every cached route.
    pub coalescer: Arc<Coalescer>,
    /// What makes an anonymous request one "with credentials" (RFC 9111 §3.5).
    pub credentials: Arc<Credentials>,
    /// Lookups by [`CacheStatus`], in [`CacheStatus::ALL`] order.
    pub outcomes: [Counter; 5],
}

impl RouteCache {
    /// Counts a lookup's outcome (the metric; the access log reads `RequestCtx::cache`).
    pub fn count(&self, status: CacheStatus) {
        self.outcomes[status as usize].inc();
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
            // method, provider and issuer too: an API key named `alice` is not the JWT subject
            // `alice`, and subjects are unique per issuer only
            format!(
                "{}:{}:{}:{}",
                i.method,
                i.provider,
                i.issuer.as_deref().unwrap_or(""),
                i.subject
            )
            .into_boxed_str()
        })
    }
}

/// Headers and query parameters that carry credentials (from the `authentication` section, plus
/// `Authorization`, `Proxy-Authorization`, `Cookie` and `DPoP`). An anonymous request carrying
/// one may get a response the upstream personalised from it, so such a response is stored for
/// others only when the upstream marks it `public` or gives it an `s-maxage`.
#[derive(Debug, Default)]
pub struct Credentials {
    headers: Vec<http::HeaderName>,
    query: Vec<String>,
}

impl Credentials {
    /// From header names and query parameter names (invalid header names are skipped: the config
    /// validation reports them).
    pub fn new(headers: &[String], query: Vec<String>) -> Self {
        Self {
            headers: headers
                .iter()
                .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            query,
        }
    }

    /// The credential header names.
    pub fn header_names(&self) -> &[http::HeaderName] {
        &self.headers
    }

    /// Whether a request with these headers and query string carries any of them.
    pub fn carried_by(&self, headers: &http::HeaderMap, query: Option<&str>) -> bool {
        self.headers.iter().any(|h| headers.contains_key(h))
            || query.is_some_and(|query| {
                query.split(['&', ';']).any(|pair| {
                    let name = pair.split('=').next().unwrap_or_default();
                    self.query.iter().any(|q| q.eq_ignore_ascii_case(name))
                })
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

/// The coalescing key of a lookup: its store key (the `Vary` variants of one key share a fetch:
/// a waiter for another variant looks again, misses, and fetches its own).
pub fn fetch_key(url: &str, route: &str, identity: Option<&str>, origin: &str) -> Box<str> {
    entry::store_key(url, route, identity, origin).into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_in_headers_and_the_query() {
        let credentials = Credentials::new(
            &["authorization".into(), "cookie".into(), "x-api-key".into()],
            vec!["api_key".into()],
        );
        let mut headers = http::HeaderMap::new();
        assert!(!credentials.carried_by(&headers, Some("page=2&sort=name")));
        assert!(credentials.carried_by(&headers, Some("page=2&API_KEY=x")));
        headers.insert("x-api-key", http::HeaderValue::from_static("k"));
        assert!(credentials.carried_by(&headers, None));
    }

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
        assert!(matches!(coalescer.join("k".into()), Turn::Lead(_)));
    }
}
