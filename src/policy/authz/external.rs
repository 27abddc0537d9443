//! External authorization: ask an HTTP policy service (OPA's data API shape) whether a request
//! may proceed, after the local rules allowed it.
//!
//! `POST url` with `{"input": {"request": …, "identity": …}}`; the answer `{"result": true}` or
//! `{"result": {"allow": true}}` allows, any other JSON answer denies (OPA answers `{}` or
//! `{"result": {}}` for undefined rules: that is no permission). Only a failure to get an answer
//! (connection, non-2xx status, a body that is not JSON, timeout) follows `on_error` (deny by
//! default: fail closed). Answers are remembered for `cache_ttl`, keyed by the SHA-256 of the
//! exact input. Which headers may be passed is checked by `config::validate` (never credentials).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};
use serde_json::{json, Map, Value};

use crate::{
    config::model::{ExternalAuthorizerConfig, FailureMode},
    policy::authn::{sha256, Identity},
    upstream::ServiceEndpoint,
};

/// A compiled external policy service.
#[derive(Debug)]
pub struct ExternalAuthorizer {
    pub name: Arc<str>,
    endpoint: ServiceEndpoint,
    timeout: Duration,
    cache_ttl: Duration,
    cache: DecisionCache,
    on_error: FailureMode,
    headers: Box<[HeaderName]>,
    claims: Box<[Box<str>]>,
}

/// What the service said, for the decision log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalAnswer {
    Allow,
    Deny,
    /// The service failed; `on_error` decided.
    Failed {
        allowed: bool,
        reason: &'static str,
    },
}

impl ExternalAnswer {
    pub fn allowed(self) -> bool {
        match self {
            Self::Allow => true,
            Self::Deny => false,
            Self::Failed { allowed, .. } => allowed,
        }
    }
}

/// The request attributes a policy service sees.
pub struct ExternalRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub host: &'a str,
    pub client_ip: IpAddr,
    pub route: &'a str,
    pub headers: &'a HeaderMap,
    /// The configured roles the identity holds, inclusion expanded.
    pub roles: Vec<&'a str>,
}

impl ExternalAuthorizer {
    pub fn from_config(config: &ExternalAuthorizerConfig) -> Result<Self, (String, String)> {
        let endpoint = ServiceEndpoint::from_url(&config.url, config.timeout.0)
            .map_err(|message| ("url".to_owned(), message))?;
        let mut headers = Vec::new();
        for (i, name) in config.headers.iter().enumerate() {
            let field = format!("headers[{i}]");
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (field, format!("`{name}` is not a header name")))?;
            headers.push(name);
        }
        Ok(Self {
            name: config.name.as_str().into(),
            endpoint,
            timeout: config.timeout.0,
            cache_ttl: config.cache_ttl.0,
            cache: DecisionCache::new(config.cache_size),
            on_error: config.on_error,
            headers: headers.into(),
            claims: config.claims.iter().map(|c| c.as_str().into()).collect(),
        })
    }

    /// The input document for a request (also what `explain` would send).
    pub fn input(&self, request: &ExternalRequest<'_>, identity: &Identity) -> Value {
        let headers: Map<String, Value> = self
            .headers
            .iter()
            .filter_map(|name| {
                let value = request.headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), Value::from(value)))
            })
            .collect();
        let claims: Map<String, Value> = self
            .claims
            .iter()
            .filter_map(|path| Some((path.to_string(), identity.claim(path)?.into_owned())))
            .collect();
        json!({"input": {
            "request": {
                "method": request.method.as_str(),
                "path": request.path,
                "host": request.host,
                "client_ip": request.client_ip.to_string(),
                "route": request.route,
                "headers": headers,
            },
            "identity": {
                "subject": &*identity.subject,
                "provider": &*identity.provider,
                "method": identity.method,
                "issuer": identity.issuer.as_deref(),
                "credential_roles": identity.roles.iter().map(|r| &**r).collect::<Vec<_>>(),
                "roles": request.roles,
                "scopes": identity.scopes.iter().map(|s| &**s).collect::<Vec<_>>(),
                "claims": claims,
            },
        }})
    }

    /// Asks the service (or the cache) about a request.
    pub async fn decide(
        &self,
        request: &ExternalRequest<'_>,
        identity: &Identity,
    ) -> ExternalAnswer {
        let body = self.input(request, identity).to_string();
        let key = sha256(body.as_bytes());
        let now = Instant::now();
        if let Some(allowed) = self.cache.get(&key, now) {
            return if allowed {
                ExternalAnswer::Allow
            } else {
                ExternalAnswer::Deny
            };
        }
        let asked = tokio::time::timeout(
            self.timeout,
            self.endpoint
                .post_for_json("application/json", &[], Bytes::from(body)),
        )
        .await;
        let answer = match asked {
            Ok(Ok(answer)) => Ok(verdict(&answer)),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err("the policy service did not answer in time"),
        };
        match answer {
            Ok(allowed) => {
                if !self.cache_ttl.is_zero() {
                    self.cache.insert(key, now + self.cache_ttl, allowed);
                }
                if allowed {
                    ExternalAnswer::Allow
                } else {
                    ExternalAnswer::Deny
                }
            }
            Err(reason) => {
                tracing::warn!(
                    authorizer = &*self.name,
                    reason,
                    "external authorization failed"
                );
                ExternalAnswer::Failed {
                    allowed: self.on_error == FailureMode::Allow,
                    reason,
                }
            }
        }
    }
}

/// Reads OPA's answer shapes: only `true` and `{"allow": true}` allow.
fn verdict(answer: &Map<String, Value>) -> bool {
    match answer.get("result") {
        Some(Value::Bool(allowed)) => *allowed,
        Some(Value::Object(result)) => result.get("allow") == Some(&Value::Bool(true)),
        // `{}` (an undefined rule), or a result of another shape: no permission
        _ => false,
    }
}

const SHARDS: usize = 8;

/// Input digest → (remembered until, allowed).
type DecisionShard = HashMap<[u8; 32], (Instant, bool)>;

/// Bounded, sharded memory of recent decisions.
#[derive(Debug)]
struct DecisionCache {
    shards: Box<[Mutex<DecisionShard>]>,
    per_shard: usize,
}

impl DecisionCache {
    fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(
        &self,
        key: &[u8; 32],
    ) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Instant, bool)>> {
        self.shards[key[0] as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &[u8; 32], now: Instant) -> Option<bool> {
        if self.per_shard == 0 {
            return None;
        }
        let shard = self.shard(key);
        let &(until, allowed) = shard.get(key)?;
        (until > now).then_some(allowed)
    }

    fn insert(&self, key: [u8; 32], until: Instant, allowed: bool) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(&key);
        if shard.len() >= self.per_shard {
            // drop what expired; if the shard is still full of live answers, start it afresh:
            // one O(n) sweep per `per_shard` inserts, so a client that makes every request miss
            // cannot make each insert pay for a sweep
            let now = Instant::now();
            shard.retain(|_, (until, _)| *until > now);
            if shard.len() * 2 >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(key, (until, allowed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opa_answer_shapes() {
        let parse = |text: &str| {
            verdict(
                serde_json::from_str::<Map<String, Value>>(text)
                    .as_ref()
                    .unwrap(),
            )
        };
        assert!(parse(r#"{"result": true}"#));
        assert!(parse(r#"{"result": {"allow": true}}"#));
        for denied in [
            r#"{"result": false}"#,
            r#"{"result": {"allow": false}}"#,
            r#"{}"#,
            r#"{"result": {}}"#,
            r#"{"result": {"allowed": true}}"#,
            r#"{"result": {"allow": "true"}}"#,
            r#"{"result": "yes"}"#,
            r#"{"result": [true]}"#,
        ] {
            assert!(!parse(denied), "{denied}");
        }
    }

    #[test]
    fn the_cache_forgets_at_expiry_and_stays_bounded() {
        let cache = DecisionCache::new(16);
        let now = Instant::now();
        cache.insert([1; 32], now + Duration::from_secs(5), true);
        assert_eq!(cache.get(&[1; 32], now), Some(true));
        assert_eq!(cache.get(&[1; 32], now + Duration::from_secs(6)), None);
        for i in 0..=255u8 {
            cache.insert([i; 32], now + Duration::from_secs(5), false);
        }
        let total: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= 16, "{total}");
    }
}
