//! Revoked credentials: token ids (`jti`) and subjects that must be refused even though they
//! verify. Fed through the admin API; checked on every request, also for identities that came
//! from a cache; kept across reloads (it lives with the gateway, not the config).

use std::{
    collections::{HashMap, HashSet},
    sync::RwLock,
};

/// The revocation list.
#[derive(Debug, Default)]
pub struct RevocationList {
    /// Revoked `jti`s and when they may be forgotten (their token's expiry; `u64::MAX` if unknown).
    token_ids: RwLock<HashMap<String, u64>>,
    subjects: RwLock<HashSet<String>>,
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
