//! One-time use of tokens: a provider with `one_time_use` accepts each `jti` once. A used `jti`
//! is remembered until its token expires (after that the token is refused for `exp` anyway),
//! either in this process's memory, bounded (when the memory is full of live entries, new tokens
//! are refused rather than risking a replay), or in Redis, shared by every replica (when Redis
//! cannot answer, tokens are refused). Both fail closed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::store::RedisStore;

/// The longest a used id is remembered in Redis for a token without `exp`.
const MAX_SHARED_MEMORY: Duration = Duration::from_secs(366 * 86_400);

/// Kept in Redis this much longer than the token verifies: covers the fraction of the last
/// second (times are whole seconds) and small clock differences between replicas.
const SHARED_MARGIN_SECS: u64 = 2;

/// Where a provider remembers used token ids.
#[derive(Debug)]
pub enum ReplayStore {
    Memory(ReplayGuard),
    Shared {
        store: Arc<RedisStore>,
        /// `{kind}:{provider}:`, the start of every key; the kind keeps one-time token ids and
        /// DPoP proof ids (which clients choose) apart whatever the providers are called.
        key_prefix: Box<str>,
    },
}

impl ReplayStore {
    /// In `shared` when given, else in this process's memory (`capacity` ids). `kind` names
    /// what is remembered (`jti` for one-time tokens, `dpop` for proofs).
    pub fn new(
        shared: Option<Arc<RedisStore>>,
        kind: &'static str,
        provider: &str,
        capacity: usize,
    ) -> Self {
        match shared {
            Some(store) => Self::Shared {
                store,
                key_prefix: format!("{kind}:{provider}:").into(),
            },
            None => Self::Memory(ReplayGuard::new(capacity)),
        }
    }

    /// Records `jti` as used until `expires_at`; refuses it if it was used already (by this
    /// process, or with a shared store by any replica).
    pub async fn first_use(
        &self,
        jti: Option<&str>,
        expires_at: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        match self {
            Self::Memory(guard) => guard.first_use(jti, expires_at, now),
            Self::Shared { store, key_prefix } => {
                let jti = jti
                    .filter(|j| !j.is_empty())
                    .ok_or(ReplayError::MissingJti)?;
                let ttl = Duration::from_secs(
                    expires_at
                        .saturating_sub(now)
                        .saturating_add(SHARED_MARGIN_SECS),
                )
                .min(MAX_SHARED_MEMORY);
                // hashed: bounded key length whatever the token says, and no raw ids in Redis
                let digest = super::cache::sha256(jti.as_bytes());
                let mut key = String::with_capacity(key_prefix.len() + 64);
                key.push_str(key_prefix);
                for byte in digest {
                    use std::fmt::Write as _;
                    let _ = write!(key, "{byte:02x}");
                }
                match store.set_if_absent(&key, ttl).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ReplayError::Replayed),
                    Err(error) => {
                        tracing::warn!(key_prefix = %key_prefix, %error, "replay store unavailable; refusing");
                        Err(ReplayError::Unavailable)
                    }
                }
            }
        }
    }
}

const SHARDS: usize = 16;

/// Used ids and when each may be forgotten.
type Shard = Mutex<HashMap<Box<str>, u64>>;

/// Remembers used token ids until they expire.
#[derive(Debug)]
pub struct ReplayGuard {
    shards: Box<[Shard]>,
    per_shard: usize,
}

/// Why a token was refused as a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// The `jti` was used before.
    Replayed,
    /// The token has no `jti`, so one-time use cannot be enforced.
    MissingJti,
    /// Too many live ids to remember one more.
    Full,
    /// The shared store did not answer.
    Unavailable,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// Records `jti` as used until `expires_at`; refuses it if it was used already.
    pub fn first_use(
        &self,
        jti: Option<&str>,
        expires_at: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        let jti = jti
            .filter(|j| !j.is_empty())
            .ok_or(ReplayError::MissingJti)?;
        let shard = &self.shards[super::cache::sha256(jti.as_bytes())[0] as usize % SHARDS];
        let mut used = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&until) = used.get(jti) {
            if until >= now {
                return Err(ReplayError::Replayed);
            }
        }
        if used.len() >= self.per_shard {
            used.retain(|_, until| *until >= now);
            if used.len() >= self.per_shard {
                return Err(ReplayError::Full);
            }
        }
        used.insert(jti.into(), expires_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_jti_is_accepted_once_until_it_expires() {
        let guard = ReplayGuard::new(1000);
        assert_eq!(guard.first_use(Some("a"), 100, 10), Ok(()));
        assert_eq!(
            guard.first_use(Some("a"), 100, 11),
            Err(ReplayError::Replayed)
        );
        assert_eq!(guard.first_use(Some("b"), 100, 11), Ok(()));
        assert_eq!(guard.first_use(None, 100, 11), Err(ReplayError::MissingJti));
        assert_eq!(
            guard.first_use(Some(""), 100, 11),
            Err(ReplayError::MissingJti)
        );
        // once expired, the entry may be forgotten (the token itself is refused for exp anyway)
        assert_eq!(guard.first_use(Some("a"), 300, 200), Ok(()));
    }

    #[test]
    fn a_full_guard_fails_closed() {
        let guard = ReplayGuard::new(16);
        let mut refused = 0;
        for i in 0..200 {
            if guard.first_use(Some(&format!("id-{i}")), 1_000, 0) == Err(ReplayError::Full) {
                refused += 1;
            }
        }
        assert!(refused > 0);
        // expired entries make room again
        assert_eq!(guard.first_use(Some("late"), 5_000, 2_000), Ok(()));
    }
}
