//! Revoked credentials: token ids (`jti`) and subjects that must be refused even though they
//! verify. Fed through the admin API; checked on every request, also for identities that came
//! from a cache; kept across reloads (it lives with the gateway, not the config).
//!
//! With `revocations.store: redis`, Redis holds the authoritative list: the admin API writes
//! there first, and each replica copies it into its local list every `sync_interval`, so the
//! request path still reads only local memory.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use crate::store::{RedisStore, StoreError};

/// The revocation list.
#[derive(Debug, Default)]
pub struct RevocationList {
    /// Revoked `jti`s and when they may be forgotten (their token's expiry; `u64::MAX` if unknown).
    token_ids: RwLock<HashMap<String, u64>>,
    subjects: RwLock<HashSet<String>>,
    has_shared_copy: AtomicBool,
}

impl RevocationList {
    /// Whether a verified identity has been revoked.
    pub fn is_revoked(&self, token_id: Option<&str>, subject: &str) -> bool {
        let by_id = token_id.is_some_and(|id| {
            let ids = self.token_ids.read().unwrap_or_else(|e| e.into_inner());
            !ids.is_empty() && ids.contains_key(id)
        });
        by_id || {
            let subjects = self.subjects.read().unwrap_or_else(|e| e.into_inner());
            !subjects.is_empty() && subjects.contains(subject)
        }
    }

    pub fn revoke_token(&self, token_id: &str, expires_at: Option<u64>, now: u64) {
        let mut ids = self.token_ids.write().unwrap_or_else(|e| e.into_inner());
        ids.retain(|_, until| *until >= now);
        ids.insert(token_id.to_owned(), expires_at.unwrap_or(u64::MAX));
    }

    pub fn revoke_subject(&self, subject: &str) {
        self.subjects
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subject.to_owned());
    }

    /// Lifts a subject's revocation.
    pub fn restore_subject(&self, subject: &str) -> bool {
        self.subjects
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(subject)
    }

    /// Takes the shared list as a whole (ids past their expiry already left out).
    fn replace(&self, token_ids: HashMap<String, u64>, subjects: HashSet<String>) {
        *self.token_ids.write().unwrap_or_else(|e| e.into_inner()) = token_ids;
        *self.subjects.write().unwrap_or_else(|e| e.into_inner()) = subjects;
        self.has_shared_copy.store(true, Ordering::Release);
    }

    /// True once a shared list has been copied in during this process's life: before that, a
    /// restarted replica knows none of the shared revocations (the gateway is not ready).
    pub fn has_shared_copy(&self) -> bool {
        self.has_shared_copy.load(Ordering::Acquire)
    }

    /// For the admin API.
    pub fn snapshot(&self) -> serde_json::Value {
        let ids = self.token_ids.read().unwrap_or_else(|e| e.into_inner());
        let subjects = self.subjects.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<&String> = ids.keys().collect();
        ids.sort();
        let mut subjects: Vec<&String> = subjects.iter().collect();
        subjects.sort();
        serde_json::json!({ "token_ids": ids, "subjects": subjects })
    }
}

/// Revocations kept in Redis: a hash of revoked `jti`s (value: when they may be forgotten, `0`
/// for never) and a set of revoked subjects.
#[derive(Debug)]
pub struct SharedRevocations {
    store: Arc<RedisStore>,
    pub sync_interval: Duration,
}

impl SharedRevocations {
    pub fn new(store: Arc<RedisStore>, sync_interval: Duration) -> Self {
        Self {
            store,
            sync_interval,
        }
    }

    pub async fn revoke_token(&self, jti: &str, expires_at: Option<u64>) -> Result<(), StoreError> {
        let mut command = redis::cmd("HSET");
        command
            .arg(self.store.key("revoked:jti"))
            .arg(jti)
            .arg(expires_at.unwrap_or(0));
        self.store.query::<()>(&command).await
    }

    pub async fn revoke_subject(&self, subject: &str) -> Result<(), StoreError> {
        let mut command = redis::cmd("SADD");
        command.arg(self.store.key("revoked:sub")).arg(subject);
        self.store.query::<()>(&command).await
    }

    /// True when the subject was revoked.
    pub async fn restore_subject(&self, subject: &str) -> Result<bool, StoreError> {
        let mut command = redis::cmd("SREM");
        command.arg(self.store.key("revoked:sub")).arg(subject);
        Ok(self.store.query::<u64>(&command).await? > 0)
    }

    /// Copies the shared list into `list`, and forgets expired ids in Redis.
    pub async fn pull_into(&self, list: &RevocationList, now: u64) -> Result<(), StoreError> {
        let ids_key = self.store.key("revoked:jti");
        let ids: HashMap<String, u64> = self
            .store
            .query(redis::cmd("HGETALL").arg(&ids_key))
            .await?;
        let subjects: HashSet<String> = self
            .store
            .query(redis::cmd("SMEMBERS").arg(self.store.key("revoked:sub")))
            .await?;
        let (live, expired): (HashMap<String, u64>, HashMap<String, u64>) = ids
            .into_iter()
            .map(|(id, until)| (id, if until == 0 { u64::MAX } else { until }))
            .partition(|(_, until)| *until >= now);
        list.replace(live, subjects);
        if !expired.is_empty() {
            let mut command = redis::cmd("HDEL");
            command.arg(&ids_key);
            for id in expired.keys() {
                command.arg(id);
            }
            self.store.query::<()>(&command).await?;
        }
        Ok(())
    }
}

/// Keeps the local list in step with the shared one; stops when dropped.
pub struct RevocationSync {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RevocationSync {
    /// Pulls now, then every `sync_interval`. Call inside a runtime. Does nothing without a
    /// shared store.
    pub fn start(shared: Option<Arc<SharedRevocations>>, list: Arc<RevocationList>) -> Self {
        let task = shared.map(|shared| {
            tokio::spawn(async move {
                let mut failing = false;
                loop {
                    match shared.pull_into(&list, super::unix_now()).await {
                        Ok(()) if failing => {
                            tracing::info!("shared revocations readable again");
                            failing = false;
                        }
                        Ok(()) => {}
                        Err(error) if !failing => {
                            tracing::warn!(%error, "cannot read the shared revocations; keeping the last copy");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    tokio::time::sleep(shared.sync_interval).await;
                }
            })
        });
        Self { task }
    }
}

impl Drop for RevocationSync {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_ids_and_subjects_are_refused() {
        let list = RevocationList::default();
        assert!(!list.is_revoked(Some("a"), "alice"));
        list.revoke_token("a", Some(100), 0);
        list.revoke_subject("bob");
        assert!(list.is_revoked(Some("a"), "alice"));
        assert!(list.is_revoked(None, "bob"));
        assert!(!list.is_revoked(Some("b"), "alice"));
        assert!(list.restore_subject("bob"));
        assert!(!list.is_revoked(None, "bob"));
        // expired revocations are forgotten when new ones arrive
        list.revoke_token("c", None, 200);
        assert!(!list.is_revoked(Some("a"), "alice"));
    }
}
