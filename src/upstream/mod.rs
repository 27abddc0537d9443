//! Upstreams: named pools of targets, with pooled keep-alive connections per worker, load
//! balancing, active health checks, passive outlier ejection, timeouts and budgeted retries.
//!
//! Compiled `Upstream`s live in the config snapshot; what must survive a reload (target health,
//! connection pools, the retry budget) lives in the [`UpstreamRegistry`], keyed by upstream name
//! and target URL.

mod balance;
mod client;
pub mod health;
mod retry;
mod service;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{uri::Authority, HeaderValue, Request, Response};

pub use balance::Balancer;
pub use client::{
    set_worker_slot, ClientSettings, ConnectionPool, TargetScheme, UpstreamError,
    UpstreamResponseBody,
};
pub use retry::RetryBudget;
pub use service::ServiceEndpoint;

use crate::{
    config::model::{HealthCheckConfig, OutlierDetectionConfig},
    pipeline::{BodyTooLarge, GatewayError, UpstreamBody},
};

/// Live state of one target, shared by every worker and kept across reloads.
#[derive(Debug)]
pub struct TargetState {
    in_flight: AtomicU32,
    /// Result of active health checks (true until a check says otherwise).
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Passive ejection end, in ms since the registry's epoch; 0 = not ejected.
    ejected_until_ms: AtomicU64,
}

impl Default for TargetState {
    fn default() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }
}

impl TargetState {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend target as compiled for a snapshot.
#[derive(Debug)]
pub struct Target {
    /// The URL as written in the config, for logs.
    pub label: Arc<str>,
    pub authority: Authority,
    pub weight: u32,
    pub state: Arc<TargetState>,
}

impl Target {
    fn is_available(&self, now_ms: u64) -> bool {
        self.state.is_healthy() && !self.state.is_ejected(now_ms)
    }

    /// Requests being sent to (or answered by) this target.
    pub fn in_flight(&self) -> u32 {
        self.state.in_flight.load(Ordering::Relaxed)
    }
}

/// State that outlives a snapshot, keyed by stable names.
#[derive(Debug)]
pub struct UpstreamRegistry {
    epoch: Instant,
    workers: usize,
    inner: Mutex<HashMap<String, Arc<SharedUpstream>>>,
    /// Remote JWKS key sets live as long as the gateway too (a reload keeps their keys).
    pub jwks: crate::policy::authn::JwksRegistry,
    /// So do revocations.
    pub revocations: Arc<crate::policy::authn::RevocationList>,
    /// Rate-limit state, kept across reloads (a reload does not hand every client a new burst).
    pub rate_limit_buckets: Arc<crate::policy::ratelimit::LocalBuckets>,
    /// Adaptive behaviour scores, kept across reloads too.
    pub adaptive_scores: Arc<crate::policy::ratelimit::Scores>,
    /// Open connections per client address.
    pub connection_counts: Arc<crate::policy::ratelimit::ConnectionCounts>,
    /// Requests in flight per route and upstream.
    pub in_flight: crate::policy::ratelimit::InFlightCounters,
    /// Metrics, live statistics, alert states, the access-log writer.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The in-memory response cache (a reload keeps what it holds).
    pub responses: Arc<crate::cache::MemoryStore>,
    /// Concurrent cache misses waiting for one fetch.
    pub cache_fetches: Arc<crate::cache::Coalescer>,
}

#[derive(Debug, Default)]
struct SharedUpstream {
    targets: Mutex<HashMap<String, Arc<TargetState>>>,
    pools: Mutex<HashMap<ClientSettings, Arc<ConnectionPool>>>,
    /// The budget with the `(percent, min_per_second)` it was made for.
    budget: Mutex<Option<(BudgetParams, Arc<RetryBudget>)>>,
}

type BudgetParams = (u32, u32);

impl UpstreamRegistry {
    /// `workers`: number of worker threads, each of which gets its own connection pools.
    pub fn new(workers: usize) -> Self {
        Self::with_telemetry(workers, Arc::new(crate::telemetry::Telemetry::inert()))
    }

    /// A registry whose snapshots report to `telemetry` (a serving gateway's).
    pub fn with_telemetry(workers: usize, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        let defaults = crate::config::model::CacheConfig::default();
        Self {
            responses: Arc::new(crate::cache::MemoryStore::new(
                defaults.max_size.0,
                telemetry.metrics.cache_store.clone(),
            )),
            cache_fetches: Arc::default(),
            telemetry,
            epoch: Instant::now(),
            workers,
            inner: Mutex::default(),
            jwks: Default::default(),
            revocations: Default::default(),
            rate_limit_buckets: Default::default(),
            adaptive_scores: Default::default(),
            connection_counts: Default::default(),
            in_flight: Default::default(),
        }
    }

    /// The instant that ejection deadlines are measured from (stable across reloads).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    fn shared(&self, upstream: &str) -> Arc<SharedUpstream> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.entry(upstream.to_owned()).or_default().clone()
    }

    /// The live state of a target (created on first sight, then kept across reloads).
    pub fn target_state(&self, upstream: &str, url: &str) -> Arc<TargetState> {
        let shared = self.shared(upstream);
        let mut targets = shared.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.entry(url.to_owned()).or_default().clone()
    }

    /// The connection pool for these settings (kept across reloads while the settings are unchanged).
    pub fn pool(&self, upstream: &str, settings: ClientSettings) -> Arc<ConnectionPool> {
        let shared = self.shared(upstream);
        let mut pools = shared.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(settings.clone())
            .or_insert_with(|| Arc::new(ConnectionPool::new(settings, self.workers + 1)))
            .clone()
    }

    pub fn retry_budget(
        &self,
        upstream: &str,
        percent: u32,
        min_per_second: u32,
    ) -> Arc<RetryBudget> {
        let shared = self.shared(upstream);
        let mut budget = shared.budget.lock().unwrap_or_else(|e| e.into_inner());
        match &*budget {
            Some((params, existing)) if *params == (percent, min_per_second) => existing.clone(),
            _ => {
                let fresh = Arc::new(RetryBudget::new(percent, min_per_second));
                *budget = Some(((percent, min_per_second), fresh.clone()));
                fresh
            }
        }
    }
}

/// A compiled upstream.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub scheme: TargetScheme,
    pub targets: Box<[Target]>,
    pub balancer: Balancer,
    pub hash_on: Option<HashKey>,
    pub connect_timeout: Duration,
    pub per_try_timeout: Duration,
    pub total_timeout: Duration,
    pub max_retries: u32,
    pub budget: Arc<RetryBudget>,
    pub outlier: Option<OutlierDetectionConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub pool: Arc<ConnectionPool>,
    pub epoch: Instant,
}

/// Where the consistent-hash key comes from.
#[derive(Debug, Clone)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(Box<str>),
    ClientIp,
}

/// The outcome of forwarding: the upstream's response, plus what the access log wants to know.
pub struct Forwarded {
    pub response: Response<UpstreamResponseBody>,
    pub target: Arc<str>,
    pub retries: u32,
    /// When forwarding began (for the upstream latency).
    pub started: Instant,
}

/// Why forwarding failed, with the target that was tried last (if any).
pub struct ForwardFailure {
    pub error: GatewayError,
    pub target: Option<Arc<str>>,
    pub retries: u32,
    pub started: Instant,
}

impl Upstream {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The time to compare ejection deadlines with; without outlier detection nothing is ejected
    /// (not even targets ejected under an earlier config), and no clock is read.
    pub fn ejection_clock(&self) -> u64 {
        if self.outlier.is_some() {
            self.now_ms()
        } else {
            u64::MAX
        }
    }

    /// Sends a prepared request (headers already rewritten, URI holding path and query) to a
    /// target, retrying idempotent bodiless requests on connect failure or 502/503 within the
    /// retry budget, and bounded by the per-try and total timeouts.
    pub async fn forward(
        &self,
        mut request: Request<UpstreamBody>,
        hash_key: Option<&[u8]>,
        mut set_host_to_target: bool,
    ) -> Result<Forwarded, ForwardFailure> {
        // one clock read serves the deadline, the first try's timeout and the latency
        let started = Instant::now();
        let deadline = started + self.total_timeout;
        let mut now = started;
        let retryable = self.max_retries > 0
            && is_idempotent(request.method())
            && matches!(request.body(), UpstreamBody::Empty);
        if retryable {
            self.budget.deposit();
        }
        let mut retries = 0;
        let mut previous: Option<usize> = None;
        // an upload the client broke off or has not finished does not count against the target
        let client_body = request.body().progress();
        let blame_target = |client_body: &Option<Arc<crate::pipeline::BodyProgress>>| {
            client_body
                .as_ref()
                .is_none_or(|body| body.finished() && !body.client_failed())
        };
        if !request.headers().contains_key(http::header::HOST) {
            set_host_to_target = true;
        }
        loop {
            let Some(index) =
                self.balancer
                    .pick(&self.targets, previous, hash_key, self.ejection_clock())
            else {
                return Err(ForwardFailure {
                    error: GatewayError::NoHealthyTarget,
                    target: previous.map(|i| self.targets[i].label.clone()),
                    retries,
                    started,
                });
            };
            let target = &self.targets[index];
            let can_retry = retryable && retries < self.max_retries;
            if set_host_to_target {
                if let Ok(host) = HeaderValue::from_str(target.authority.as_str()) {
                    request.headers_mut().insert(http::header::HOST, host);
                }
            }
            // a retry after a 502/503 needs a copy: the original is consumed by sending it
            // (after a connect failure the pool hands the unsent request back)
            let spare = can_retry.then(|| clone_bodiless(&request));
            let try_deadline = (now + self.per_try_timeout).min(deadline);
            let try_timeout = try_deadline.saturating_duration_since(now);
            target.state.begin_request();
            let result = tokio::time::timeout_at(
                try_deadline.into(),
                self.pool.send(&target.authority, request),
            )
            .await;
            target.state.end_request();
            let failure = match result {
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    self.record_outcome(target, status < 500);
                    match spare {
                        Some(spare)
                            if (status == 502 || status == 503) && self.budget.try_withdraw() =>
                        {
                            tracing::debug!(
                                upstream = &*self.name,
                                upstream_target = &*target.label,
                                status,
                                "retrying"
                            );
                            request = spare;
                            retries += 1;
                            previous = Some(index);
                            now = Instant::now();
                            continue;
                        }
                        _ => {
                            return Ok(Forwarded {
                                response,
                                target: target.label.clone(),
                                retries,
                                started,
                            })
                        }
                    }
                }
                Ok(Err(failure)) => {
                    // the client's oversize or broken-off body is not the target's fault
                    if !is_body_too_large(&failure.error) && blame_target(&client_body) {
                        self.record_outcome(target, false);
                    }
                    tracing::warn!(upstream = &*self.name, upstream_target = &*target.label, error = %error_chain(&failure.error), "upstream request failed");
                    if failure.error.is_connect() {
                        let again = failure.request.or(spare);
                        if let Some(again) =
                            again.filter(|_| can_retry && self.budget.try_withdraw())
                        {
                            request = again;
                            retries += 1;
                            previous = Some(index);
                            now = Instant::now();
                            continue;
                        }
                        GatewayError::UpstreamConnect
                    } else if is_body_too_large(&failure.error) {
                        GatewayError::PayloadTooLarge
                    } else {
                        GatewayError::UpstreamProtocol
                    }
                }
                Err(_elapsed) => {
                    if blame_target(&client_body) {
                        self.record_outcome(target, false);
                    }
                    tracing::warn!(
                        upstream = &*self.name,
                        upstream_target = &*target.label,
                        timeout_ms = try_timeout.as_millis() as u64,
                        "upstream timed out"
                    );
                    GatewayError::UpstreamTimeout
                }
            };
            return Err(ForwardFailure {
                error: failure,
                target: Some(target.label.clone()),
                retries,
                started,
            });
        }
    }

    /// Passive outlier detection: consecutive failures eject a target for a while.
    fn record_outcome(&self, target: &Target, success: bool) {
        let Some(outlier) = &self.outlier else { return };
        let state = &target.state;
        if success {
            if state.consecutive_failures.load(Ordering::Relaxed) != 0 {
                state.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures {
            return;
        }
        let now = self.now_ms();
        let ejected = self
            .targets
            .iter()
            .filter(|t| t.state.is_ejected(now))
            .count();
        // rounded down: one target at 50% is never ejected (there would be nowhere to go)
        let allowed = self.targets.len() * outlier.max_ejection_percent as usize / 100;
        if ejected >= allowed {
            return;
        }
        state.consecutive_failures.store(0, Ordering::Relaxed);
        state.ejected_until_ms.store(
            now + outlier.ejection_time.0.as_millis() as u64,
            Ordering::Relaxed,
        );
        crate::telemetry::metrics::PROCESS.ejection(&self.name);
        tracing::warn!(
            upstream = &*self.name,
            upstream_target = &*target.label,
            failures,
            ejection_ms = outlier.ejection_time.0.as_millis() as u64,
            "target ejected after consecutive failures"
        );
    }
}

fn clone_bodiless(request: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(UpstreamBody::Empty);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<BodyTooLarge>() {
            return true;
        }
        source = error.source();
    }
    false
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
pub(crate) fn test_targets(weights: &[u32]) -> Vec<Target> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Target {
            label: format!("http://10.0.0.{i}:80").into(),
            authority: format!("10.0.0.{i}:80").parse().unwrap(),
            weight,
            state: Arc::default(),
        })
        .collect()
}
