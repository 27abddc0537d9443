//! Rate limiting: layered GCRA limits on keys made of the client's address or network, its
//! identity, the route, the method or request class, claims and headers.
//!
//! Every rule that applies to a request is checked; the request is refused with 429 if any
//! (non-shadow) rule refuses, and then the rules it had already passed are refunded, so a refused
//! request costs nothing. Rules whose key needs no identity run before authentication (a flood or
//! a password-guessing client is stopped before any token is verified); the others run after
//! authorization. A rule whose key has no value for a request (no identity, a missing header)
//! does not count it.

mod adaptive;
mod concurrency;
mod fast;
mod gcra;
mod local;
mod rule;
mod shared;

use std::{fmt::Write as _, sync::Arc};

use http::HeaderValue;

pub use adaptive::{Adaptive, Assessment, Report, Scores, SharedScores, SharedScoresTask};
pub use concurrency::{
    ConnectionCounts, ConnectionSlot, InFlightCounters, InFlightLimit, InFlightPermit,
};
pub use fast::{FastSync, FastSyncTask};
pub use gcra::{Limit, Verdict};
pub use local::{now_ns, LocalBuckets};
pub use rule::{class_of, network, parse_rate, KeyPart, KeySource, Rule};
pub use shared::{SharedLimiter, SharedVerdict};

/// Where limits shared by replicas are decided.
#[derive(Debug, Clone)]
pub enum SharedMode {
    /// By Redis on every request.
    Exact(Arc<SharedLimiter>),
    /// Locally, synced with Redis in the background.
    Fast(Arc<FastSync>),
}

use crate::{
    config::{
        model::{RateLimitsConfig, RedisLimitMode, StoreFailure, StoreKind},
        ErrorSink,
    },
    pipeline::GatewayError,
    store::RedisStore,
};

/// The compiled `rate_limits` section.
#[derive(Debug, Default)]
pub struct RateLimits {
    pub rules: std::collections::HashMap<String, Arc<Rule>>,
    /// Rules with `global: true`, in config order.
    pub global: Vec<Arc<Rule>>,
    pub headers: bool,
    /// With `store: redis`.
    pub shared: Option<SharedMode>,
    /// Adaptive limits (`rate_limits.adaptive`).
    pub adaptive: Option<Arc<Adaptive>>,
    /// Every rule name written, compiled or not (a broken rule is reported once, not again by
    /// each route that lists it).
    declared: std::collections::HashSet<String>,
}

impl RateLimits {
    pub fn compile(
        config: &RateLimitsConfig,
        redis: Option<&Arc<RedisStore>>,
        buckets: &Arc<LocalBuckets>,
        scores: &Arc<Scores>,
        sink: &mut ErrorSink<'_>,
    ) -> Self {
        let shared = match (config.store, redis) {
            (StoreKind::Memory, _) => None,
            (StoreKind::Redis, Some(store)) => Some(match config.redis_mode {
                RedisLimitMode::Exact => SharedMode::Exact(Arc::new(SharedLimiter::new(
                    store.clone(),
                    config.on_store_error,
                    config.replicas,
                    // a failure keeps Redis out for a while: a second, or 4 timeouts if longer
                    (store.timeout() * 4).max(std::time::Duration::from_secs(1)),
                ))),
                RedisLimitMode::Fast => SharedMode::Fast(Arc::new(FastSync::new(
                    store.clone(),
                    buckets.clone(),
                    config.sync_interval.0,
                    config.on_store_error,
                    config.replicas,
                ))),
            }),
            (StoreKind::Redis, None) => {
                sink.error(
                    "rate_limits.store",
                    "`store: redis` needs the top-level `redis` section",
                );
                None
            }
        };
        if config.replicas == 0 {
            sink.error("rate_limits.replicas", "must be at least 1");
        }
        if config.sync_interval.0 < std::time::Duration::from_millis(5) {
            sink.error("rate_limits.sync_interval", "must be at least 5ms");
        }
        let mut compiled = Self {
            headers: config.headers,
            shared,
            adaptive: config.adaptive.as_ref().map(|adaptive| {
                // scores are shared where the counts are
                let redis = redis.filter(|_| config.store == StoreKind::Redis);
                Arc::new(Adaptive::compile(adaptive, scores.clone(), redis, sink))
            }),
            ..Self::default()
        };
        let mut names = std::collections::HashSet::new();
        for (i, rule) in config.rules.iter().enumerate() {
            compiled.declared.insert(rule.name.clone());
            if !names.insert(rule.name.as_str()) {
                sink.error(
                    format!("rate_limits.rules[{i}].name"),
                    format!("rule `{}` is defined twice", rule.name),
                );
                continue;
            }
            match Rule::compile(rule) {
                Ok(rule) => {
                    let rule = Arc::new(rule);
                    if rule.global {
                        compiled.global.push(rule.clone());
                    }
                    compiled.rules.insert(rule.name.to_string(), rule);
                }
                Err((field, message)) => {
                    sink.error(format!("rate_limits.rules[{i}].{field}"), message)
                }
            }
        }
        if config.max_keys == 0 {
            sink.error("rate_limits.max_keys", "must be more than 0");
        }
        if config.max_connections_per_ip == Some(0) {
            sink.error(
                "rate_limits.max_connections_per_ip",
                "must be more than 0 (0 would refuse every connection)",
            );
        }
        compiled
    }

    /// A route's limits: the global rules and those it lists. `None` when no rule applies.
    pub fn route(
        &self,
        i: usize,
        names: &[String],
        store: &Arc<LocalBuckets>,
        sink: &mut ErrorSink<'_>,
    ) -> Option<Arc<RouteLimits>> {
        let mut rules = self.global.clone();
        for (j, name) in names.iter().enumerate() {
            match self.rules.get(name) {
                Some(rule) if !rules.iter().any(|r| Arc::ptr_eq(r, rule)) => {
                    rules.push(rule.clone())
                }
                Some(_) => {}
                None if self.declared.contains(name) => {}
                None => sink.error(
                    format!("routes[{i}].rate_limits[{j}]"),
                    format!("no rate-limit rule is named `{name}`"),
                ),
            }
        }
        if rules.is_empty() {
            return None;
        }
        let (after_auth, before_auth): (Vec<_>, Vec<_>) =
            rules.into_iter().partition(|rule| rule.needs_identity());
        Some(Arc::new(RouteLimits {
            before_auth: before_auth.into(),
            after_auth: after_auth.into(),
            store: store.clone(),
            shared: self.shared.clone(),
            headers: self.headers,
        }))
    }
}

/// The claims rate-limit keys read (`claim:NAME`): verified identities keep them.
pub fn claims_read(config: &RateLimitsConfig) -> impl Iterator<Item = &str> {
    config
        .rules
        .iter()
        .flat_map(|rule| &rule.key)
        .filter_map(|part| part.strip_prefix("claim:"))
        .filter(|name| !name.is_empty())
}

/// The rules of one route, split by when they can run.
#[derive(Debug)]
pub struct RouteLimits {
    /// Keys without identity parts: checked before authentication.
    pub before_auth: Box<[Arc<Rule>]>,
    /// Keys with identity parts: checked after authorization.
    pub after_auth: Box<[Arc<Rule>]>,
    pub store: Arc<LocalBuckets>,
    /// The shared store, when limits are kept in Redis.
    pub shared: Option<SharedMode>,
    pub headers: bool,
}

/// Which phase of the route's rules to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    BeforeAuth,
    AfterAuth,
}

/// What the rate limits decided about a request, for the headers and the access log.
#[derive(Debug)]
pub struct Record {
    /// The adaptive multiplier on this request's limits (1.0: none).
    pub multiplier: f64,
    /// Refused because the client is blocked by its behaviour score (such refusals do not
    /// add to the score: a block must not extend itself).
    pub blocked: bool,
    /// The enforced rule closest to its limit (or the one that refused).
    pub outcome: Option<Outcome>,
    /// A shadow rule that would have refused the request.
    pub shadow_refusal: Option<Arc<str>>,
    /// Send `RateLimit-Policy` / `RateLimit` on the response.
    pub send_headers: bool,
    /// Keys this request was counted against (to refund them if a later rule refuses it).
    counted: Vec<(u64, Limit)>,
    /// The same in the shared store (`exact` mode).
    shared_counted: Vec<(String, Arc<Rule>, Limit)>,
    /// Counts waiting for the next sync (`fast` mode), with their drain generation.
    fast_counted: Vec<([u8; 16], u64)>,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            multiplier: 1.0,
            blocked: false,
            outcome: None,
            shadow_refusal: None,
            send_headers: false,
            counted: Vec::new(),
            shared_counted: Vec::new(),
            fast_counted: Vec::new(),
        }
    }
}

/// One enforced rule's state after a request.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub rule: Arc<Rule>,
    pub remaining: u32,
    pub reset_after_ns: u64,
    /// This rule refused the request.
    pub refused: bool,
}

impl Outcome {
    /// `RateLimit-Policy` and `RateLimit` header values (draft-ietf-httpapi-ratelimit-headers).
    pub fn headers(&self) -> (HeaderValue, Option<HeaderValue>) {
        let mut value = String::with_capacity(self.rule.name.len() + 24);
        let _ = write!(
            value,
            "\"{}\";r={};t={}",
            self.rule.name,
            self.remaining,
            self.reset_after_ns.div_ceil(1_000_000_000)
        );
        // one allocation: the string becomes the header's bytes
        (
            self.rule.policy_header.clone(),
            HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok(),
        )
    }
}

impl RouteLimits {
    /// Checks the phase's rules; `record` keeps the most restrictive enforced rule met across
    /// phases. A refused request is refunded to every rule it had passed, in either phase and
    /// store, so it costs the client nothing beyond the refusal.
    pub async fn check(
        &self,
        phase: Phase,
        source: &KeySource<'_>,
        record: &mut Record,
    ) -> Result<(), GatewayError> {
        let result = self.check_phase(phase, source, record).await;
        if matches!(result, Err(GatewayError::TooManyRequests { .. })) {
            self.refund(record).await;
        }
        result
    }

    /// Takes the request back from every rule it was counted against (it was refused later).
    pub async fn refund(&self, record: &mut Record) {
        for (key, limit) in record.counted.drain(..) {
            self.store.refund(key, &limit);
        }
        match &self.shared {
            Some(SharedMode::Fast(sync)) => {
                for (digest, generation) in record.fast_counted.drain(..) {
                    sync.uncount(&digest, generation);
                }
            }
            Some(SharedMode::Exact(shared)) => {
                let counted = std::mem::take(&mut record.shared_counted);
                if !counted.is_empty() {
                    shared.refund(&counted).await;
                }
            }
            None => {}
        }
    }

    async fn check_phase(
        &self,
        phase: Phase,
        source: &KeySource<'_>,
        record: &mut Record,
    ) -> Result<(), GatewayError> {
        let rules = match phase {
            Phase::BeforeAuth => &self.before_auth,
            Phase::AfterAuth => &self.after_auth,
        };
        if rules.is_empty() {
            return Ok(());
        }
        record.send_headers = self.headers;
        let shared = match &self.shared {
            None => return self.check_local(rules, source, record, 1.0, Buckets::Own),
            Some(SharedMode::Fast(sync)) if sync.healthy() => {
                return self.check_local(rules, source, record, 1.0, Buckets::Synced(sync))
            }
            Some(SharedMode::Fast(sync)) => {
                return match sync.on_error {
                    // the same buckets, which hold what the last syncs brought, on this
                    // replica's share: an outage hands no client a fresh budget
                    StoreFailure::FailOpen => {
                        sync.fallbacks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.check_local(rules, source, record, sync.share, Buckets::SyncedStale)
                    }
                    StoreFailure::FailClosed => {
                        sync.fallbacks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Err(GatewayError::LimiterUnavailable)
                    }
                };
            }
            Some(SharedMode::Exact(shared)) => shared,
        };
        // shadow rules stay local (they are a rollout aid); enforced rules go to Redis
        let (shadow, enforced): (Vec<&Arc<Rule>>, Vec<&Arc<Rule>>) = rules
            .iter()
            .filter(|rule| rule.applies(&source.request.method))
            .partition(|rule| rule.shadow);
        if !shadow.is_empty() {
            self.check_local_rules(shadow.into_iter(), source, record, 1.0, Buckets::Own)?;
        }
        let multiplier = record.multiplier;
        let keys: Vec<(String, Arc<Rule>, Limit)> = enforced
            .iter()
            .filter_map(|rule| {
                let limit = rule.limit.scaled(multiplier);
                Some((rule.shared_key(source)?, (*rule).clone(), limit))
            })
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        match shared.check(&keys).await {
            Ok(SharedVerdict::Allowed(aheads)) => {
                for ((name, rule, limit), ahead) in keys.into_iter().zip(aheads) {
                    let slack = (limit.tolerance + limit.interval).saturating_sub(ahead);
                    note(
                        record,
                        &rule,
                        u32::try_from(slack / limit.interval).unwrap_or(u32::MAX),
                        ahead,
                    );
                    record.shared_counted.push((name, rule, limit));
                }
                Ok(())
            }
            Ok(SharedVerdict::Refused {
                index,
                retry_after_ns,
                reset_after_ns,
            }) => {
                let refused = keys.get(index).map(|(_, rule, _)| rule.clone());
                if let Some(rule) = refused {
                    record.outcome = Some(Outcome {
                        rule,
                        remaining: 0,
                        reset_after_ns,
                        refused: true,
                    });
                }
                Err(too_many(retry_after_ns))
            }
            Err(_) => match shared.on_error {
                StoreFailure::FailOpen => {
                    shared
                        .fallbacks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.check_local_rules(
                        enforced.into_iter(),
                        source,
                        record,
                        shared.share,
                        Buckets::Own,
                    )
                }
                StoreFailure::FailClosed => {
                    shared
                        .fallbacks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Err(GatewayError::LimiterUnavailable)
                }
            },
        }
    }

    fn check_local(
        &self,
        rules: &[Arc<Rule>],
        source: &KeySource<'_>,
        record: &mut Record,
        share: f64,
        buckets: Buckets<'_>,
    ) -> Result<(), GatewayError> {
        let applicable = rules
            .iter()
            .filter(|rule| rule.applies(&source.request.method));
        self.check_local_rules(applicable, source, record, share, buckets)
    }

    /// Checks rules against this process' buckets, each limit scaled by `share`.
    fn check_local_rules<'r>(
        &self,
        rules: impl Iterator<Item = &'r Arc<Rule>>,
        source: &KeySource<'_>,
        record: &mut Record,
        share: f64,
        buckets: Buckets<'_>,
    ) -> Result<(), GatewayError> {
        let now = now_ns();
        for rule in rules {
            // shadow rules always count in their own buckets
            let buckets = if rule.shadow { Buckets::Own } else { buckets };
            let sync = match buckets {
                Buckets::Synced(sync) => Some(sync),
                Buckets::Own | Buckets::SyncedStale => None,
            };
            let (key, digest) = match buckets {
                Buckets::Synced(_) | Buckets::SyncedStale => {
                    let Some(digest) = rule.shared_digest(source) else {
                        continue;
                    };
                    (FastSync::local_key(&digest), Some(digest))
                }
                Buckets::Own => {
                    let Some(key) = rule.key(self.store.hasher(), source) else {
                        continue;
                    };
                    (key, None)
                }
            };
            let base = rule.limit.scaled(record.multiplier);
            let (key, limit) = match sync {
                Some(sync) => sync.bucket_for(key, base),
                None => (key, base.scaled(share)),
            };
            let verdict = self.store.check(key, &limit, now);
            if rule.shadow {
                if !verdict.allowed {
                    tracing::info!(rule = &*rule.name, "shadow rate limit would refuse");
                    record
                        .shadow_refusal
                        .get_or_insert_with(|| rule.name.clone());
                }
                continue;
            }
            if !verdict.allowed {
                record.outcome = Some(Outcome {
                    rule: rule.clone(),
                    remaining: 0,
                    reset_after_ns: verdict.reset_after,
                    refused: true,
                });
                return Err(too_many(verdict.retry_after));
            }
            record.counted.push((key, limit));
            if let (Some(sync), Some(digest)) = (sync, digest) {
                // the shared state counts every request at the whole limit's interval
                let generation = sync.count(digest, &rule.limit);
                record.fast_counted.push((digest, generation));
            }
            note(record, rule, verdict.remaining, verdict.reset_after);
        }
        Ok(())
    }
}

/// Which in-process buckets a check uses.
#[derive(Clone, Copy)]
enum Buckets<'a> {
    /// This process' own (keys hashed with its random hash key).
    Own,
    /// `fast` mode's, keyed alike on every replica; allowed requests are counted for the sync.
    Synced(&'a FastSync),
    /// The same buckets while Redis is unreachable: nothing is counted for a sync.
    SyncedStale,
}

/// Keeps the rule closest to its limit for the headers.
fn note(record: &mut Record, rule: &Arc<Rule>, remaining: u32, reset_after_ns: u64) {
    let tighter = record
        .outcome
        .as_ref()
        .is_none_or(|current| remaining < current.remaining);
    if tighter {
        record.outcome = Some(Outcome {
            rule: rule.clone(),
            remaining,
            reset_after_ns,
            refused: false,
        });
    }
}

fn too_many(retry_after_ns: u64) -> GatewayError {
    let seconds = retry_after_ns.div_ceil(1_000_000_000).max(1);
    GatewayError::TooManyRequests {
        retry_after_secs: u32::try_from(seconds).unwrap_or(u32::MAX),
    }
}
