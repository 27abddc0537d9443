//! Adaptive limits: a behaviour score per client address, client network and subject.
//!
//! Suspicious outcomes (401, 403, 404, malformed requests, 429) add points; a score decays
//! exponentially with the configured half-life. Thresholds turn a score into a multiplier on the
//! client's limits (0.1 = a tenth of every limit) or a temporary block (every request refused
//! with 429 for the period). Subjects with a clean authenticated history may earn a bonus
//! multiplier above 1. The scores live in the registry, so a reload keeps them.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    net::IpAddr,
    sync::{Mutex, MutexGuard},
};

use serde::Serialize;

use super::local::now_ns;
use crate::{
    config::{model::AdaptiveConfig, ErrorSink},
    pipeline::RequestCtx,
    policy::authn::Identity,
};

const SHARDS: usize = 32;

/// The scores, kept across reloads.
#[derive(Debug)]
pub struct Scores {
    shards: Box<[Mutex<HashMap<u64, Entry>>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Scores {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// `ip:203.0.113.7`, `net:203.0.113.0/24`, `subject:corp/alice`.
    name: Box<str>,
    score: f64,
    /// When `score` was last brought up to date (ns, monotonic).
    updated: u64,
    blocked_until: u64,
    /// Successful authenticated requests (subjects only).
    good: u64,
}

/// One scored client, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub client: String,
    pub score: f64,
    pub multiplier: f64,
    pub blocked_for_secs: u64,
    pub successful_requests: u64,
}

/// What the scores say about a request's client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assessment {
    /// Applied to every limit of the request (1.0: unchanged).
    pub multiplier: f64,
    /// Blocked for this many more nanoseconds.
    pub blocked_for: u64,
}

/// The compiled `rate_limits.adaptive` section over the shared scores.
#[derive(Debug)]
pub struct Adaptive {
    scores: std::sync::Arc<Scores>,
    points: crate::config::model::AdaptivePointsConfig,
    half_life_ns: f64,
    network: (u8, u8),
    /// Ascending by score: (score, multiplier, block ns).
    thresholds: Vec<(f64, f64, u64)>,
    bonus: Option<(u64, f64, f64)>,
    max_per_shard: usize,
}

/// A scored entity.
enum Client<'a> {
    Ip(IpAddr),
    Network(IpAddr),
    Subject(&'a Identity),
}

impl Client<'_> {
    fn name(&self, prefix: (u8, u8)) -> String {
        match self {
            Self::Ip(ip) => format!("ip:{ip}"),
            Self::Network(net) => format!(
                "net:{net}/{}",
                if net.is_ipv4() { prefix.0 } else { prefix.1 }
            ),
            Self::Subject(identity) => {
                format!("subject:{}/{}", identity.provider, identity.subject)
            }
        }
    }

    fn key(&self, hasher: &impl BuildHasher) -> u64 {
        match self {
            Self::Ip(ip) => hasher.hash_one((0u8, ip)),
            Self::Network(net) => hasher.hash_one((1u8, net)),
            Self::Subject(identity) => {
                hasher.hash_one((2u8, &*identity.provider, &*identity.subject))
            }
        }
    }
}

impl Adaptive {
    pub fn compile(
        config: &AdaptiveConfig,
        scores: std::sync::Arc<Scores>,
        sink: &mut ErrorSink<'_>,
    ) -> Self {
        let field = "rate_limits.adaptive";
        if config.half_life.0.is_zero() {
            sink.error(format!("{field}.half_life"), "must be more than 0");
        }
        let mut thresholds = Vec::new();
        for (i, threshold) in config.thresholds.iter().enumerate() {
            let at = format!("{field}.thresholds[{i}]");
            match (threshold.multiplier, &threshold.block) {
                (Some(m), None) if m > 0.0 && m < 1.0 => thresholds.push((threshold.score, m, 0)),
                (Some(_), None) => sink.error(
                    format!("{at}.multiplier"),
                    "a multiplier tightens limits: above 0 and below 1 (a bonus is `bonus`)",
                ),
                (None, Some(block)) if !block.0.is_zero() => {
                    thresholds.push((threshold.score, 0.0, block.0.as_nanos() as u64))
                }
                _ => sink.error(
                    &at,
                    "give a threshold either `multiplier` or `block` (above 0)",
                ),
            }
            if threshold.score.is_nan() || threshold.score <= 0.0 {
                sink.error(format!("{at}.score"), "must be above 0");
            }
        }
        if thresholds.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
            sink.error(
                format!("{field}.thresholds"),
                "scores must go up from one threshold to the next",
            );
        }
        let bonus = config.bonus.as_ref().and_then(|bonus| {
            if !(bonus.multiplier > 1.0 && bonus.multiplier <= 100.0) {
                sink.error(
                    format!("{field}.bonus.multiplier"),
                    "a bonus is above 1 (and at most 100)",
                );
                return None;
            }
            Some((bonus.min_requests, bonus.multiplier, bonus.max_score))
        });
        Self {
            scores,
            points: config.points.clone(),
            half_life_ns: config.half_life.0.as_nanos() as f64,
            network: (config.network.ipv4.min(32), config.network.ipv6.min(128)),
            thresholds,
            bonus,
            max_per_shard: config.max_entries.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.scores.shards[(key >> 59) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn decayed(&self, entry: &Entry, now: u64) -> f64 {
        let elapsed = now.saturating_sub(entry.updated) as f64;
        entry.score * (-elapsed / self.half_life_ns * std::f64::consts::LN_2).exp()
    }

    fn multiplier_for(&self, score: f64) -> f64 {
        self.thresholds
            .iter()
            .filter(|(at, multiplier, _)| score >= *at && *multiplier > 0.0)
            .map(|(_, multiplier, _)| *multiplier)
            .fold(1.0, f64::min)
    }

    fn clients<'a>(&self, ip: IpAddr, identity: Option<&'a Identity>) -> Vec<Client<'a>> {
        let mut clients = vec![
            Client::Ip(ip),
            Client::Network(super::rule::network(ip, self.network.0, self.network.1)),
        ];
        if let Some(identity) = identity {
            clients.push(Client::Subject(identity));
        }
        clients
    }

    /// The client's multiplier and block, for the address alone (before authentication) or
    /// with the identity.
    pub fn assess(&self, ip: IpAddr, identity: Option<&Identity>) -> Assessment {
        let now = now_ns();
        let mut assessment = Assessment {
            multiplier: 1.0,
            blocked_for: 0,
        };
        let mut bonus = false;
        for client in self.clients(ip, identity) {
            let key = client.key(&self.scores.hasher);
            let shard = self.shard(key);
            let Some(entry) = shard.get(&key) else {
                continue;
            };
            assessment.blocked_for = assessment
                .blocked_for
                .max(entry.blocked_until.saturating_sub(now));
            let score = self.decayed(entry, now);
            assessment.multiplier = assessment.multiplier.min(self.multiplier_for(score));
            if let (Client::Subject(_), Some((min_requests, _, max_score))) = (&client, self.bonus)
            {
                bonus = entry.good >= min_requests && score < max_score;
            }
        }
        if let (true, Some((_, multiplier, _))) = (bonus, self.bonus) {
            if assessment.multiplier >= 1.0 {
                assessment.multiplier = multiplier;
            }
        }
        assessment
    }

    /// Scores a finished request by its status.
    pub fn observe(&self, ctx: &RequestCtx) {
        let points = match ctx.status {
            401 => self.points.auth_failure,
            403 => self.points.forbidden,
            404 => self.points.not_found,
            400 | 413 => self.points.malformed,
            // a 429 counts against the client only when a rule on the client itself refused
            // it: not a block (which would extend itself), not a shared budget (a route's) that
            // others exhausted
            429 if ctx.rate_limit.blocked => return,
            429 if !ctx
                .rate_limit
                .outcome
                .as_ref()
                .is_some_and(|outcome| outcome.refused && outcome.rule.keys_client()) =>
            {
                return
            }
            429 => self.points.rate_limited,
            status if (200..300).contains(&status) => {
                if let (Some(identity), Some(_)) = (&ctx.identity, self.bonus) {
                    self.update(&Client::Subject(identity), |entry, _| entry.good += 1);
                }
                return;
            }
            _ => return,
        };
        if points <= 0.0 {
            return;
        }
        for client in self.clients(ctx.client_ip, ctx.identity.as_deref()) {
            // a network is many clients: its score tightens limits, but never blocks it whole
            let may_block = !matches!(client, Client::Network(_));
            self.update(&client, |entry, score_now| {
                entry.score = score_now + points;
                if !may_block {
                    return;
                }
                if let Some((_, _, block)) = self
                    .thresholds
                    .iter()
                    .rev()
                    .find(|(at, _, block)| *block > 0 && entry.score >= *at)
                {
                    let until = entry.updated + block;
                    if until > entry.blocked_until {
                        if entry.blocked_until <= entry.updated {
                            tracing::warn!(
                                client = &*entry.name,
                                score = entry.score,
                                "client blocked by its behaviour score"
                            );
                        }
                        entry.blocked_until = until;
                    }
                }
            });
        }
    }

    /// Applies `change` to a client's entry (created when missing), the score decayed to now.
    fn update(&self, client: &Client<'_>, change: impl FnOnce(&mut Entry, f64)) {
        let now = now_ns();
        let key = client.key(&self.scores.hasher);
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && shard.len() >= self.max_per_shard {
            // forget the least suspicious client of the shard
            // (blocked ones last: the map stays bounded even when all are blocked)
            let lowest = shard
                .iter()
                .min_by(|a, b| {
                    (a.1.blocked_until > now)
                        .cmp(&(b.1.blocked_until > now))
                        .then(self.decayed(a.1, now).total_cmp(&self.decayed(b.1, now)))
                })
                .map(|(k, _)| *k);
            if let Some(lowest) = lowest {
                shard.remove(&lowest);
            }
        }
        let entry = shard.entry(key).or_insert_with(|| Entry {
            name: client.name(self.network).into(),
            score: 0.0,
            updated: now,
            blocked_until: 0,
            good: 0,
        });
        let score_now = self.decayed(entry, now);
        entry.score = score_now;
        entry.updated = now;
        change(entry, score_now);
    }

    /// The most suspicious clients first.
    pub fn suspicious(&self, limit: usize) -> Vec<Report> {
        let now = now_ns();
        let mut all: Vec<Report> = self
            .scores
            .shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard
                    .values()
                    .map(|entry| {
                        let score = self.decayed(entry, now);
                        Report {
                            client: entry.name.to_string(),
                            score: (score * 100.0).round() / 100.0,
                            multiplier: self.multiplier_for(score),
                            blocked_for_secs: entry
                                .blocked_until
                                .saturating_sub(now)
                                .div_ceil(1_000_000_000),
                            successful_requests: entry.good,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|report| report.score >= 0.01 || report.blocked_for_secs > 0)
            .collect();
        all.sort_by(|a, b| {
            b.blocked_for_secs
                .cmp(&a.blocked_for_secs)
                .then(b.score.total_cmp(&a.score))
        });
        all.truncate(limit);
        all
    }

    /// Forgets a client's score and block (`ip:…`, `net:…`, `subject:…` as listed).
    pub fn clear(&self, name: &str) -> bool {
        let mut cleared = false;
        for shard in self.scores.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.len();
            shard.retain(|_, entry| &*entry.name != name);
            cleared |= shard.len() != before;
        }
        cleared
    }
}
