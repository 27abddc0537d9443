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
    sync::{Arc, Mutex, MutexGuard},
};

use serde::Serialize;

use super::local::now_ns;
use crate::{
    config::{model::AdaptiveConfig, ErrorSink},
    pipeline::RequestCtx,
    policy::authn::Identity,
    store::RedisStore,
};

/// Adds points to scores kept in Redis (hash fields `s`, the score, and `t`, when it was last
/// decayed, in ms of the server clock), decaying them first, and returns the new scores.
/// ARGV: half-life (ms), then one number of points per key (0: only read the score).
const SCORES: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local half_life = tonumber(ARGV[1])
local result = {}
for i = 1, #KEYS do
  local points = tonumber(ARGV[i + 1])
  local fields = redis.call('HMGET', KEYS[i], 's', 't')
  local score = tonumber(fields[1] or '0')
  local at = tonumber(fields[2] or tostring(now))
  score = score * math.pow(2, -(now - at) / half_life)
  if points > 0 then
    score = score + points
    redis.call('HSET', KEYS[i], 's', string.format('%.6f', score), 't', string.format('%.0f', now))
    redis.call('PEXPIRE', KEYS[i], half_life * 20)
  end
  result[i] = string.format('%.6f', score)
end
return result
"#;

/// Events not yet pushed, and clients to look up, at most this many per sync.
const MAX_PENDING: usize = 10_000;

/// Scores shared by the replicas through Redis: each pushes the points it saw and looks up the
/// clients it does not know, every `sync_interval`; a client misbehaving at one replica is
/// known to the others within that time.
pub struct SharedScores {
    store: Arc<RedisStore>,
    script: redis::Script,
    half_life_ms: u64,
    interval: std::time::Duration,
    /// Points seen since the last sync, by local key.
    pending: Mutex<HashMap<u64, Pending>>,
    /// Clients seen without a local score, by local key.
    lookups: Mutex<HashMap<u64, Lookup>>,
}

struct Pending {
    name: Box<str>,
    points: f64,
    may_block: bool,
}

struct Lookup {
    name: String,
    may_block: bool,
}

/// One client of a sync.
#[derive(Clone, Copy)]
struct Synced<'a> {
    key: u64,
    name: &'a str,
    points: f64,
    may_block: bool,
}

impl std::fmt::Debug for SharedScores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedScores")
            .field("interval", &self.interval)
            .finish()
    }
}

impl SharedScores {
    fn add(&self, key: u64, name: Box<str>, points: f64, may_block: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING && !pending.contains_key(&key) {
            return; // a flood of distinct clients: they are still scored here
        }
        pending
            .entry(key)
            .or_insert(Pending {
                name,
                points: 0.0,
                may_block,
            })
            .points += points;
    }

    fn look_up(&self, key: u64, name: impl FnOnce() -> String, may_block: bool) {
        let mut lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        if lookups.len() < MAX_PENDING {
            lookups.entry(key).or_insert_with(|| Lookup {
                name: name(),
                may_block,
            });
        }
    }

    /// One sync: pushes the points seen since the last one and reads the scores of clients
    /// this replica does not know, then takes the higher scores.
    pub async fn sync_once(&self, adaptive: &Adaptive) -> Result<usize, crate::store::StoreError> {
        let pending: Vec<(u64, Pending)> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let lookups: Vec<(u64, Lookup)> = self
            .lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let entries: Vec<(String, Synced<'_>)> = pending
            .iter()
            .map(|(key, p)| Synced {
                key: *key,
                name: &p.name,
                points: p.points,
                may_block: p.may_block,
            })
            .chain(lookups.iter().map(|(key, l)| Synced {
                key: *key,
                name: &l.name,
                points: 0.0,
                may_block: l.may_block,
            }))
            .map(|client| (self.store.key(&format!("as:{}", client.name)), client))
            .collect();
        for group in super::shared::slot_groups(&self.store, &entries) {
            let keys: Vec<String> = group.iter().map(|&i| entries[i].0.clone()).collect();
            let mut args = vec![self.half_life_ms.to_string()];
            args.extend(group.iter().map(|&i| format!("{:.6}", entries[i].1.points)));
            let scores: Vec<String> = self.store.run_script(&self.script, &keys, &args).await?;
            for (&i, score) in group.iter().zip(scores) {
                let client = entries[i].1;
                if let Ok(score) = score.parse::<f64>() {
                    adaptive.absorb(client.key, client.name, score, client.may_block);
                }
            }
        }
        Ok(entries.len())
    }
}

/// The background sync of shared scores; stopped when dropped.
#[derive(Debug, Default)]
pub struct SharedScoresTask {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SharedScoresTask {
    /// Call inside a runtime. Does nothing unless scores are shared.
    pub fn start(adaptive: Option<Arc<Adaptive>>) -> Self {
        let task = adaptive
            .filter(|adaptive| adaptive.shared.is_some())
            .map(|adaptive| {
                tokio::spawn(async move {
                    let Some(shared) = adaptive.shared.clone() else {
                        return;
                    };
                    let mut ticker = tokio::time::interval(shared.interval);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut failing = false;
                    loop {
                        ticker.tick().await;
                        match shared.sync_once(&adaptive).await {
                            Ok(_) if failing => {
                                tracing::info!("behaviour scores sync with Redis again");
                                failing = false;
                            }
                            Ok(_) => {}
                            Err(error) if !failing => {
                                tracing::warn!(%error, "behaviour scores cannot sync with Redis; each replica scores alone meanwhile");
                                failing = true;
                            }
                            Err(_) => {}
                        }
                    }
                })
            });
        Self { task }
    }
}

impl Drop for SharedScoresTask {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

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

impl Entry {
    fn new(name: Box<str>, now: u64) -> Self {
        Self {
            name,
            score: 0.0,
            updated: now,
            blocked_until: 0,
            good: 0,
        }
    }
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
    /// With `rate_limits.store: redis`: scores shared with the other replicas.
    pub shared: Option<Arc<SharedScores>>,
}

/// A scored entity.
enum Client<'a> {
    Ip(IpAddr),
    Network(IpAddr),
    Subject(&'a Identity),
}

impl Client<'_> {
    /// A network is many clients: its score tightens limits, but never blocks it whole.
    fn may_be_blocked(&self) -> bool {
        !matches!(self, Self::Network(_))
    }

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
        redis: Option<&Arc<RedisStore>>,
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
            shared: redis.map(|store| {
                Arc::new(SharedScores {
                    store: store.clone(),
                    script: redis::Script::new(SCORES),
                    half_life_ms: config.half_life.0.as_millis().max(1) as u64,
                    interval: config.sync_interval.0,
                    pending: Mutex::default(),
                    lookups: Mutex::default(),
                })
            }),
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
                drop(shard);
                if let Some(shared) = &self.shared {
                    // unknown here: ask the shared store at the next sync what the others know
                    shared.look_up(key, || client.name(self.network), client.may_be_blocked());
                }
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

    /// Adds `points` to the score of `ip`'s network (anomaly detection found it acting up).
    /// Networks are tightened, never blocked whole.
    pub fn penalize_network(&self, ip: IpAddr, points: f64) {
        let client = Client::Network(super::rule::network(ip, self.network.0, self.network.1));
        let (key, name) = self.update(&client, |entry, score_now| entry.score = score_now + points);
        if let Some(shared) = &self.shared {
            shared.add(key, name, points, false);
        }
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
            let may_block = client.may_be_blocked();
            let (key, name) = self.update(&client, |entry, score_now| {
                entry.score = score_now + points;
                if may_block {
                    self.apply_blocks(entry);
                }
            });
            if let Some(shared) = &self.shared {
                shared.add(key, name, points, may_block);
            }
        }
    }

    /// Starts (or extends) a block when the entry's score reached a block threshold.
    fn apply_blocks(&self, entry: &mut Entry) {
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
    }

    /// Takes a score other replicas arrived at (from the shared store) when it is higher than
    /// this replica's.
    fn absorb(&self, key: u64, name: &str, score: f64, may_block: bool) {
        let now = now_ns();
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && (score < 0.01 || shard.len() >= self.max_per_shard) {
            return;
        }
        let entry = shard
            .entry(key)
            .or_insert_with(|| Entry::new(name.into(), now));
        let local = self.decayed(entry, now);
        entry.updated = now;
        entry.score = local.max(score);
        if may_block && score > local {
            self.apply_blocks(entry);
        }
    }

    /// Applies `change` to a client's entry (created when missing), the score decayed to now;
    /// returns the entry's key and name.
    fn update(&self, client: &Client<'_>, change: impl FnOnce(&mut Entry, f64)) -> (u64, Box<str>) {
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
        let entry = shard
            .entry(key)
            .or_insert_with(|| Entry::new(client.name(self.network).into(), now));
        let score_now = self.decayed(entry, now);
        entry.score = score_now;
        entry.updated = now;
        change(entry, score_now);
        (key, entry.name.clone())
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
