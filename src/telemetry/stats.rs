//! Live statistics: per-route tallies the request path bumps (a few relaxed atomic adds), and
//! the history a sampler takes of them every interval — what the dashboard draws and the alert
//! rules judge. Kept beside the Prometheus families because those cannot be read back cheaply
//! by window.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

use super::metrics::{latency_bucket, Tally, LATENCY_BUCKETS};

const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// Cumulative tallies of one route (or of unrouted requests).
#[derive(Debug, Default)]
pub struct RouteTallies {
    requests: Tally,
    errors: Tally,
    rate_limited: Tally,
    auth_failures: Tally,
    denied: Tally,
    latency: [Tally; BUCKETS],
}

/// What a request adds to its route's tallies.
pub struct Tallied {
    pub status: u16,
    pub duration: Duration,
    pub auth_failure: bool,
    pub denied: bool,
}

impl RouteTallies {
    pub fn add(&self, request: &Tallied) {
        self.requests.add(1);
        if request.status >= 500 || request.status == 0 {
            self.errors.add(1);
        }
        if request.status == 429 {
            self.rate_limited.add(1);
        }
        if request.auth_failure {
            self.auth_failures.add(1);
        }
        if request.denied {
            self.denied.add(1);
        }
        self.latency[latency_bucket(request.duration)].add(1);
    }

    fn read(&self) -> Counts {
        Counts {
            requests: self.requests.get(),
            errors: self.errors.get(),
            rate_limited: self.rate_limited.get(),
            auth_failures: self.auth_failures.get(),
            denied: self.denied.get(),
            latency: std::array::from_fn(|i| self.latency[i].get()),
        }
    }
}

/// A reading of tallies: cumulative, or the difference of two readings (one interval).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    pub auth_failures: u64,
    pub denied: u64,
    pub latency: [u64; BUCKETS],
}

impl Counts {
    fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            rate_limited: self.rate_limited.saturating_sub(earlier.rate_limited),
            auth_failures: self.auth_failures.saturating_sub(earlier.auth_failures),
            denied: self.denied.saturating_sub(earlier.denied),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
        }
    }

    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.rate_limited += other.rate_limited;
        self.auth_failures += other.auth_failures;
        self.denied += other.denied;
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency) {
            *mine += theirs;
        }
    }

    /// The `q` quantile of the latency, in seconds: the upper bound of the bucket it falls in
    /// (the last finite bound for the overflow bucket). None without requests.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(LATENCY_BUCKETS[i.min(LATENCY_BUCKETS.len() - 1)]);
            }
        }
        LATENCY_BUCKETS.last().copied()
    }

    pub fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// One interval of one route.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Unix milliseconds at the end of the interval.
    pub at_ms: u64,
    pub counts: Counts,
    /// Gateway-wide gauges at the end of the interval.
    pub in_flight: i64,
    pub connections: i64,
    pub log_queue_fill: f64,
}

/// Samples of one series, oldest first, bounded.
#[derive(Debug, Default)]
pub struct History {
    pub samples: VecDeque<Sample>,
    last_reading: Counts,
}

impl History {
    /// The sum of the last `n` samples (fewer when the history is shorter).
    pub fn window(&self, n: usize) -> (Counts, usize) {
        self.window_before(0, n)
    }

    /// The sum of `n` samples ending `skip` samples ago.
    pub fn window_before(&self, skip: usize, n: usize) -> (Counts, usize) {
        let mut sum = Counts::default();
        let mut count = 0;
        for sample in self.samples.iter().rev().skip(skip).take(n) {
            sum.add(&sample.counts);
            count += 1;
        }
        (sum, count)
    }

    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
    }
}

/// A point on a dashboard chart.
#[derive(Debug, Serialize)]
pub struct Point {
    pub t: u64,
    pub rps: f64,
    pub error_ratio: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub in_flight: i64,
    pub connections: i64,
}

/// Cumulative totals for the dashboard.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    pub auth_failures: u64,
    pub denied: u64,
}

impl From<&Counts> for Totals {
    fn from(c: &Counts) -> Self {
        Self {
            requests: c.requests,
            errors: c.errors,
            rate_limited: c.rate_limited,
            auth_failures: c.auth_failures,
            denied: c.denied,
        }
    }
}

/// Every route's tallies and histories.
#[derive(Debug)]
pub struct LiveStats {
    routes: Mutex<HashMap<String, Arc<RouteTallies>>>,
    history: Mutex<Histories>,
    pub interval: Duration,
    capacity: usize,
}

/// The sampled series, overall and per route.
#[derive(Debug, Default)]
pub struct Histories {
    pub overall: History,
    pub routes: HashMap<String, History>,
    /// Cumulative counts per route at the last sample.
    pub totals: HashMap<String, Counts>,
    /// Cumulative counts of routes that are gone (overall totals never go down).
    pub retired: Counts,
}

impl Histories {
    /// Cumulative counts over every route, gone ones included.
    pub fn overall_totals(&self) -> Counts {
        let mut all = self.retired;
        for counts in self.totals.values() {
            all.add(counts);
        }
        all
    }
}

impl LiveStats {
    pub fn new(interval: Duration, history: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(50));
        Self {
            routes: Mutex::default(),
            history: Mutex::default(),
            interval,
            capacity: (history.as_secs_f64() / interval.as_secs_f64())
                .ceil()
                .max(2.0) as usize,
        }
    }

    /// The tallies of a route (kept across reloads, by name).
    pub fn route(&self, name: &str) -> Arc<RouteTallies> {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets routes the running config no longer has (removed, or only ever in a rejected
    /// reload), with their histories.
    pub fn retain_routes(&self, keep: impl Fn(&str) -> bool) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep(name));
        let mut histories = self.history.lock().unwrap_or_else(|e| e.into_inner());
        histories.routes.retain(|name, _| keep(name));
        let gone: Vec<String> = histories
            .totals
            .keys()
            .filter(|name| !keep(name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(counts) = histories.totals.remove(&name) {
                histories.retired.add(&counts);
            }
        }
    }

    /// How many samples a duration spans (at least one).
    pub fn samples_in(&self, duration: Duration) -> usize {
        ((duration.as_secs_f64() / self.interval.as_secs_f64()).round() as usize).max(1)
    }

    /// Takes one sample of every route; `gauges` are the gateway-wide gauges now.
    pub fn sample(&self, at_ms: u64, in_flight: i64, connections: i64, log_queue_fill: f64) {
        let routes: Vec<(String, Arc<RouteTallies>)> = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, tallies)| (name.clone(), tallies.clone()))
            .collect();
        let mut histories = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let mut overall = Counts::default();
        for (name, tallies) in routes {
            let now = tallies.read();
            let history = histories.routes.entry(name.clone()).or_default();
            let delta = now.since(&history.last_reading);
            history.last_reading = now;
            push_bounded(
                &mut history.samples,
                Sample {
                    at_ms,
                    counts: delta,
                    in_flight,
                    connections,
                    log_queue_fill,
                },
                self.capacity,
            );
            overall.add(&delta);
            histories.totals.insert(name, now);
        }
        push_bounded(
            &mut histories.overall.samples,
            Sample {
                at_ms,
                counts: overall,
                in_flight,
                connections,
                log_queue_fill,
            },
            self.capacity,
        );
    }

    /// Reads the histories under the lock.
    pub fn with_histories<T>(&self, read: impl FnOnce(&Histories) -> T) -> T {
        read(&self.history.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A series as chart points (the last `limit`).
    pub fn points(&self, history: &History, limit: usize) -> Vec<Point> {
        let secs = self.interval.as_secs_f64();
        history
            .samples
            .iter()
            .skip(history.samples.len().saturating_sub(limit))
            .map(|s| Point {
                t: s.at_ms,
                rps: round2(s.counts.requests as f64 / secs),
                error_ratio: round4(s.counts.error_ratio()),
                p50_ms: round2(s.counts.latency_quantile(0.5).unwrap_or(0.0) * 1000.0),
                p99_ms: round2(s.counts.latency_quantile(0.99).unwrap_or(0.0) * 1000.0),
                in_flight: s.in_flight,
                connections: s.connections,
            })
            .collect()
    }
}

fn push_bounded(samples: &mut VecDeque<Sample>, sample: Sample, capacity: usize) {
    if samples.len() == capacity {
        samples.pop_front();
    }
    samples.push_back(sample);
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// The busiest clients, by requests with exponential decay: a bounded sharded map the request
/// path bumps. When a shard is full, a new client takes the place of the least busy one and
/// inherits its count (the "space-saving" top-k scheme), so a flood of one-off addresses cannot
/// keep a busy client out.
#[derive(Debug)]
pub struct TopClients {
    shards: Box<[Mutex<HashMap<IpAddr, f64>>]>,
    hasher: std::collections::hash_map::RandomState,
}

const CLIENT_SHARDS: usize = 64;
const CLIENTS_PER_SHARD: usize = 256;

impl Default for TopClients {
    fn default() -> Self {
        Self {
            shards: (0..CLIENT_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }
}

/// A client on the dashboard.
#[derive(Debug, Serialize)]
pub struct ClientTraffic {
    pub client: String,
    pub requests: u64,
}

impl TopClients {
    pub fn record(&self, ip: IpAddr) {
        use std::hash::BuildHasher;
        let shard = self.hasher.hash_one(ip) as usize % CLIENT_SHARDS;
        let mut shard = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&ip) {
            *count += 1.0;
            return;
        }
        if shard.len() < CLIENTS_PER_SHARD {
            shard.insert(ip, 1.0);
            return;
        }
        let least = shard
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(ip, count)| (*ip, *count));
        if let Some((least, count)) = least {
            shard.remove(&least);
            shard.insert(ip, count + 1.0);
        }
    }

    /// Multiplies every count by `factor` and forgets clients below one request.
    pub fn decay(&self, factor: f64) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, count| {
                *count *= factor;
                *count >= 1.0
            });
        }
    }

    pub fn top(&self, limit: usize) -> Vec<ClientTraffic> {
        let mut all: Vec<(IpAddr, f64)> = self
            .shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard.iter().map(|(ip, c)| (*ip, *c)).collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all.truncate(limit);
        all.into_iter()
            .map(|(ip, count)| ClientTraffic {
                client: ip.to_string(),
                requests: count.round() as u64,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tallied(status: u16, ms: u64) -> Tallied {
        Tallied {
            status,
            duration: Duration::from_millis(ms),
            auth_failure: status == 401,
            denied: status == 403,
        }
    }

    #[test]
    fn samples_are_deltas_and_windows_sum_them() {
        let stats = LiveStats::new(Duration::from_secs(1), Duration::from_secs(10));
        let orders = stats.route("orders");
        for _ in 0..9 {
            orders.add(&tallied(200, 2));
        }
        orders.add(&tallied(502, 300));
        stats.sample(1_000, 0, 0, 0.0);
        orders.add(&tallied(401, 1));
        stats.sample(2_000, 0, 0, 0.0);
        stats.with_histories(|h| {
            let history = &h.routes["orders"];
            assert_eq!(history.samples[0].counts.requests, 10);
            assert_eq!(history.samples[1].counts.requests, 1);
            assert_eq!(history.samples[1].counts.auth_failures, 1);
            let (window, n) = history.window(2);
            assert_eq!((window.requests, window.errors, n), (11, 1, 2));
            assert_eq!(
                history.samples[0].counts.latency_quantile(0.5),
                Some(0.0025)
            );
            assert_eq!(history.samples[0].counts.latency_quantile(0.99), Some(0.5));
            assert_eq!(h.overall.window(1).0.requests, 1);
        });
    }

    #[test]
    fn history_is_bounded() {
        let stats = LiveStats::new(Duration::from_secs(1), Duration::from_secs(3));
        stats.route("a");
        for i in 0..10 {
            stats.sample(i, 0, 0, 0.0);
        }
        stats.with_histories(|h| assert_eq!(h.overall.samples.len(), 3));
    }

    #[test]
    fn top_clients_rank_and_decay() {
        let top = TopClients::default();
        for _ in 0..5 {
            top.record("10.0.0.1".parse().unwrap());
        }
        top.record("10.0.0.2".parse().unwrap());
        let ranked = top.top(10);
        assert_eq!(ranked[0].client, "10.0.0.1");
        assert_eq!(ranked[0].requests, 5);
        top.decay(0.9);
        assert_eq!(
            top.top(10).len(),
            1,
            "a client below one request is forgotten"
        );
    }

    #[test]
    fn a_flood_of_one_off_clients_does_not_push_out_a_busy_one() {
        let top = TopClients::default();
        for _ in 0..50 {
            top.record("10.0.0.1".parse().unwrap());
        }
        for i in 0..100_000u32 {
            top.record(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(top.top(1)[0].client, "10.0.0.1");
    }
}
