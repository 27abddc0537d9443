//! Remembers verified tokens so the hot path does not repeat public-key cryptography for a token
//! it has already checked (RS256 costs about as much CPU as proxying the whole request).
//!
//! Keyed by the SHA-256 of the token (collision-proof, unlike a plain hash), bounded in memory,
//! and an entry is never used past the token's own expiry.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::Identity;

const SHARDS: usize = 16;

/// A bounded, sharded map from token digest to the identity it verified as.
#[derive(Debug)]
pub struct VerifiedCache {
    shards: Box<[Shard]>,
    per_shard: usize,
}

type Shard = Mutex<HashMap<[u8; 32], Entry>>;

#[derive(Debug)]
struct Entry {
    /// Unix seconds after which the entry must not be used.
    valid_until: u64,
    /// The provider's key-set version when the token was verified: a key set that changed since
    /// (a key removed) makes the entry worthless.
    key_version: u64,
    identity: Arc<Identity>,
}

impl VerifiedCache {
    /// `capacity` 0 disables caching.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> &Shard {
        &self.shards[digest[0] as usize % SHARDS]
    }

    pub fn get(&self, digest: &[u8; 32], now: u64, key_version: u64) -> Option<Arc<Identity>> {
        if self.per_shard == 0 {
            return None;
        }
        let shard = self.shard(digest).lock().unwrap_or_else(|e| e.into_inner());
        let entry = shard.get(digest)?;
        (entry.valid_until > now && entry.key_version == key_version)
            .then(|| entry.identity.clone())
    }

    pub fn insert(
        &self,
        digest: [u8; 32],
        valid_until: u64,
        key_version: u64,
        identity: Arc<Identity>,
        now: u64,
    ) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self
            .shard(&digest)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shard.len() >= self.per_shard {
            shard.retain(|_, entry| entry.valid_until > now);
            if shard.len() >= self.per_shard {
                // still full of live tokens: forget an arbitrary one (they can be verified again)
                if let Some(key) = shard.keys().next().copied() {
                    shard.remove(&key);
                }
            }
        }
        shard.insert(
            digest,
            Entry {
                valid_until,
                key_version,
                identity,
            },
        );
    }
}

/// SHA-256 of `bytes` (aws-lc-rs).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(subject: &str) -> Arc<Identity> {
        Arc::new(Identity::for_test(subject))
    }

    #[test]
    fn entries_expire_with_their_token_and_memory_is_bounded() {
        let cache = VerifiedCache::new(32);
        cache.insert(sha256(b"a"), 100, 7, identity("a"), 50);
        assert_eq!(&*cache.get(&sha256(b"a"), 99, 7).unwrap().subject, "a");
        assert!(
            cache.get(&sha256(b"a"), 99, 8).is_none(),
            "not after the key set changed"
        );
        assert!(
            cache.get(&sha256(b"a"), 100, 7).is_none(),
            "not at or past expiry"
        );
        assert!(cache.get(&sha256(b"b"), 0, 7).is_none());
        for i in 0..10_000u32 {
            cache.insert(sha256(&i.to_le_bytes()), 1_000, 0, identity("x"), 0);
        }
        let total: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= 32, "{total}");
    }

    #[test]
    fn a_zero_capacity_cache_remembers_nothing() {
        let cache = VerifiedCache::new(0);
        cache.insert(sha256(b"a"), 100, 0, identity("a"), 0);
        assert!(cache.get(&sha256(b"a"), 1, 0).is_none());
    }
}
