//! Cache entries in Redis, so that replicas share them (`cache.store: redis`).
//!
//! One Redis key per URL, route, identity and origin (`{prefix}cache:URL␟ROUTE␟IDENTITY␟ORIGIN`)
//! holds every `Vary` variant of it (at most eight), so a lookup is one `GET`; the key expires when its longest-kept
//! variant would. A failing Redis is a miss, never an error for the client: the cache is an
//! optimisation. Purges `SCAN` for keys, so they need a standalone server (not a Cluster).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{
    control::Lifetime,
    entry::{KEY_SEPARATOR as SEPARATOR, MAX_VARIANTS_PER_KEY as MAX_VARIANTS},
    Entry, VariantKey,
};
use crate::store::{RedisStore as Redis, StoreError};

/// The shared cache store.
#[derive(Debug)]
pub struct RedisStore {
    redis: Arc<Redis>,
}

/// Why a purge failed.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("purging a Redis Cluster cache is not supported")]
    Cluster,
}

impl RedisStore {
    /// The cache's keys in `redis`, under its key prefix.
    pub fn new(redis: Arc<Redis>) -> Self {
        Self { redis }
    }

    fn key(&self, store_key: &str) -> String {
        self.redis.key(&format!("cache:{store_key}"))
    }

    async fn variants(&self, key: &str) -> Option<Vec<Entry>> {
        let mut command = redis::cmd("GET");
        command.arg(key);
        match self.redis.query::<Option<Vec<u8>>>(&command).await {
            Ok(Some(bytes)) => decode(Bytes::from(bytes)),
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, "cache lookup in redis failed; treated as a miss");
                None
            }
        }
    }

    /// The variant of `url` for `key`; `None` when absent or when Redis fails.
    pub async fn get(&self, url: &str, key: &VariantKey<'_>) -> Option<Arc<Entry>> {
        let variants = self.variants(&self.key(&key.store_key(url))).await?;
        variants.into_iter().find(|e| e.matches(key)).map(Arc::new)
    }

    /// Stores `entry` beside the other variants of its key (read, changed, written back: two
    /// replicas storing variants of one key at once may lose one of them, which is a miss later).
    pub async fn put(&self, url: &str, entry: &Entry) {
        let key = self.key(&entry.store_key(url));
        let now = SystemTime::now();
        let mut variants = self.variants(&key).await.unwrap_or_default();
        variants.retain(|v| !v.same_variant(entry) && v.age(now) < v.retention());
        while variants.len() >= MAX_VARIANTS {
            variants.remove(0);
        }
        variants.push(entry.clone());
        self.write(&key, &variants, now).await;
    }

    /// Removes one variant (one that could not be revalidated).
    pub async fn remove_variant(&self, url: &str, entry: &Entry) {
        let key = self.key(&entry.store_key(url));
        let Some(mut variants) = self.variants(&key).await else {
            return;
        };
        variants.retain(|v| !v.same_variant(entry));
        if variants.is_empty() {
            let mut command = redis::cmd("DEL");
            command.arg(&key);
            let _ = self.redis.query::<i64>(&command).await;
        } else {
            self.write(&key, &variants, SystemTime::now()).await;
        }
    }

    /// Writes `variants` to `key`, expiring when the longest-kept of them would be dropped.
    async fn write(&self, key: &str, variants: &[Entry], now: SystemTime) {
        let keep = variants
            .iter()
            .map(|v| v.retention().saturating_sub(v.age(now)))
            .max()
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        let mut command = redis::cmd("SET");
        command
            .arg(key)
            .arg(encode(variants).as_ref())
            .arg("PX")
            .arg(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
        if let Err(error) = self.redis.query::<()>(&command).await {
            tracing::debug!(%error, "storing a cache entry in redis failed");
        }
    }

    /// Deletes the entries of `url` (every route and identity), or of every URL starting with it.
    pub async fn purge(&self, url: &str, prefix: bool) -> Result<usize, PurgeError> {
        if self.redis.is_cluster() {
            return Err(PurgeError::Cluster);
        }
        let pattern = if prefix {
            format!("{}*", glob_escape(&self.redis.key(&format!("cache:{url}"))))
        } else {
            format!(
                "{}{SEPARATOR}*",
                glob_escape(&self.redis.key(&format!("cache:{url}")))
            )
        };
        let mut cursor = 0u64;
        let mut removed = std::collections::HashSet::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500);
            let (next, keys): (u64, Vec<String>) = self.redis.query(&scan).await?;
            if !keys.is_empty() {
                let mut delete = redis::cmd("DEL");
                for key in &keys {
                    delete.arg(key);
                    if let Some(url) = key.split(SEPARATOR).next() {
                        removed.insert(url.to_owned());
                    }
                }
                let _: i64 = self.redis.query(&delete).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(removed.len())
    }
}

/// Escapes Redis glob characters so a URL matches only itself.
fn glob_escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

// The wire form: a version byte, then per variant its fields, length-prefixed. Written and read
// only by this module; anything that does not decode is a miss.
const VERSION: u8 = 2;

fn encode(variants: &[Entry]) -> BytesMut {
    let mut out = BytesMut::with_capacity(
        variants
            .iter()
            .map(|v| usize::try_from(v.size()).unwrap_or(0))
            .sum(),
    );
    out.put_u8(VERSION);
    out.put_u8(variants.len() as u8);
    for entry in variants {
        out.put_u16(entry.status.as_u16());
        let stored = entry
            .stored_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        out.put_u64(u64::try_from(stored.as_millis()).unwrap_or(0));
        out.put_u64(u64::try_from(entry.lifetime.fresh_for.as_millis()).unwrap_or(u64::MAX));
        out.put_u64(u64::try_from(entry.lifetime.stale_for.as_millis()).unwrap_or(u64::MAX));
        out.put_u8(
            u8::from(entry.lifetime.revalidate) | u8::from(entry.lifetime.always_revalidate) << 1,
        );
        put_bytes(&mut out, entry.route.as_bytes());
        match &entry.identity {
            Some(identity) => {
                out.put_u8(1);
                put_bytes(&mut out, identity.as_bytes());
            }
            None => out.put_u8(0),
        }
        put_bytes(&mut out, entry.origin.as_bytes());
        out.put_u16(entry.vary.len() as u16);
        for (name, value) in &entry.vary {
            put_bytes(&mut out, name.as_str().as_bytes());
            match value {
                Some(value) => {
                    out.put_u8(1);
                    put_bytes(&mut out, value.as_bytes());
                }
                None => out.put_u8(0),
            }
        }
        out.put_u16(entry.headers.len() as u16);
        for (name, value) in &entry.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        put_bytes(&mut out, &entry.body);
    }
    out
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn decode(mut input: Bytes) -> Option<Vec<Entry>> {
    fn take(input: &mut Bytes) -> Option<Bytes> {
        if input.remaining() < 4 {
            return None;
        }
        let len = input.get_u32() as usize;
        (input.remaining() >= len).then(|| input.split_to(len))
    }
    fn text(input: &mut Bytes) -> Option<Box<str>> {
        String::from_utf8(take(input)?.to_vec())
            .ok()
            .map(String::into_boxed_str)
    }
    fn flag(input: &mut Bytes) -> Option<bool> {
        (input.remaining() >= 1).then(|| input.get_u8() == 1)
    }
    if input.remaining() < 2 || input.get_u8() != VERSION {
        return None;
    }
    let count = input.get_u8();
    let mut entries = Vec::with_capacity(count.into());
    for _ in 0..count {
        if input.remaining() < 2 + 8 * 3 + 1 {
            return None;
        }
        let status = StatusCode::from_u16(input.get_u16()).ok()?;
        let stored_at = SystemTime::UNIX_EPOCH + Duration::from_millis(input.get_u64());
        let fresh_for = Duration::from_millis(input.get_u64());
        let stale_for = Duration::from_millis(input.get_u64());
        let flags = input.get_u8();
        let route = text(&mut input)?;
        let identity = if flag(&mut input)? {
            Some(text(&mut input)?)
        } else {
            None
        };
        let origin = text(&mut input)?;
        if input.remaining() < 2 {
            return None;
        }
        let mut vary = Vec::new();
        for _ in 0..input.get_u16() {
            let name = HeaderName::from_bytes(&take(&mut input)?).ok()?;
            let value = if flag(&mut input)? {
                Some(HeaderValue::from_maybe_shared(take(&mut input)?).ok()?)
            } else {
                None
            };
            vary.push((name, value));
        }
        if input.remaining() < 2 {
            return None;
        }
        let mut headers = HeaderMap::new();
        for _ in 0..input.get_u16() {
            let name = HeaderName::from_bytes(&take(&mut input)?).ok()?;
            let value = HeaderValue::from_maybe_shared(take(&mut input)?).ok()?;
            headers.append(name, value);
        }
        let body = take(&mut input)?;
        entries.push(Entry {
            status,
            headers,
            body,
            stored_at,
            lifetime: Lifetime {
                fresh_for,
                stale_for,
                revalidate: flags & 1 != 0,
                always_revalidate: flags & 2 != 0,
            },
            route,
            identity,
            origin,
            vary,
        });
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_the_wire_form_and_garbage_is_a_miss() {
        let mut headers = HeaderMap::new();
        headers.append("etag", HeaderValue::from_static("\"v1\""));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let entry = Entry {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(b"\x00\xffbody"),
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            lifetime: Lifetime {
                fresh_for: Duration::from_secs(5),
                stale_for: Duration::from_millis(1500),
                revalidate: true,
                always_revalidate: false,
            },
            route: "r".into(),
            identity: Some("jwt:p:alice".into()),
            origin: "https:8443".into(),
            vary: vec![
                (
                    http::header::ACCEPT_LANGUAGE,
                    Some(HeaderValue::from_static("de")),
                ),
                (http::header::ACCEPT, None),
            ],
        };
        let bytes = encode(&[entry.clone(), entry.clone()]).freeze();
        let decoded = decode(bytes.clone()).unwrap();
        assert_eq!(decoded.len(), 2);
        let got = &decoded[1];
        assert_eq!(got.status, entry.status);
        assert_eq!(got.headers, entry.headers);
        assert_eq!(got.body, entry.body);
        assert_eq!(got.stored_at, entry.stored_at);
        assert_eq!(got.lifetime, entry.lifetime);
        assert_eq!(got.identity, entry.identity);
        assert_eq!(got.origin, entry.origin);
        assert_eq!(got.vary, entry.vary);
        for cut in 0..bytes.len() {
            assert!(
                decode(bytes.slice(..cut)).is_none_or(|v| v.len() < 2),
                "cut at {cut}"
            );
        }
        assert!(decode(Bytes::from_static(b"\x02\x01")).is_none());
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(glob_escape("h/a*b?[c]\\"), "h/a\\*b\\?\\[c\\]\\\\");
    }
}
