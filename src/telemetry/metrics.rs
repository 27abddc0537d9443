//! Prometheus metrics. Families are registered once per gateway; the labelled handles a request
//! updates are resolved once per route and cached (a label lookup per request costs ~8× more).
//! Labels are bounded: route names from the config, fixed method and status-class sets, error
//! kinds and failure reasons the code names — never raw paths or addresses.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        LazyLock, OnceLock,
    },
    time::Duration,
};

use http::Method;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Latency bucket bounds in seconds, shared by the histograms and the live statistics.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The route label of requests that matched no route.
pub const NO_ROUTE: &str = "(none)";

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteKindLabels {
    route: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReasonLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteRuleLabels {
    route: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TargetLabels {
    pub upstream: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AlertLabel {
    pub alert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct JwksLabels {
    pub url: String,
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn redis_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    ])
}

/// Metrics of things that live as long as the process rather than one gateway: remote key sets,
/// the Redis connection, upstream ejections (recorded where they happen, far from a gateway).
pub struct ProcessMetrics {
    pub(crate) jwks_refreshes: Family<JwksLabels, Counter>,
    pub(crate) redis_errors: Counter,
    pub(crate) redis_duration: Histogram,
    pub(crate) ejections: Family<UpstreamLabel, Counter>,
}

/// The process-wide metrics.
pub static PROCESS: LazyLock<ProcessMetrics> = LazyLock::new(|| ProcessMetrics {
    jwks_refreshes: Family::default(),
    redis_errors: Counter::default(),
    redis_duration: redis_histogram(),
    ejections: Family::default(),
});

impl ProcessMetrics {
    /// A JWKS fetch finished (`ok` or `error`).
    pub fn jwks_refresh(&self, url: &str, ok: bool) {
        self.jwks_refreshes
            .get_or_create(&JwksLabels {
                url: url.to_owned(),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// One Redis command (or script) finished after `elapsed`.
    pub fn redis_command(&self, elapsed: Duration, ok: bool) {
        self.redis_duration.observe(elapsed.as_secs_f64());
        if !ok {
            self.redis_errors.inc();
        }
    }

    /// Outlier detection ejected one of `upstream`'s targets.
    pub fn ejection(&self, upstream: &str) {
        self.ejections
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .inc();
    }
}

/// One gateway's metric families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily<RequestLabels>,
    errors: Family<RouteKindLabels, Counter>,
    auth_failures: Family<RouteReasonLabels, Counter>,
    denials: Family<RouteLabel, Counter>,
    rate_limited: Family<RouteRuleLabels, Counter>,
    security: [Counter; 4],
    pub in_flight: Gauge,
    pub open_connections: Gauge,
    pub(crate) upstream_in_flight: Family<UpstreamLabel, Gauge>,
    pub(crate) target_healthy: Family<TargetLabels, Gauge>,
    pub(crate) target_ejected: Family<TargetLabels, Gauge>,
    pub(crate) log_queue: Gauge,
    pub(crate) log_capacity: Gauge,
    pub(crate) log_dropped: Counter,
    pub(crate) log_lines: Counter,
    alerts_firing: Family<AlertLabel, Gauge>,
    /// The alert names `alerts_firing` has series for.
    alert_names: std::sync::Mutex<Vec<String>>,
    pub(crate) reloads: Family<KindLabel, Counter>,
    pub(crate) spans_exported: Counter,
    pub(crate) networks_tracked: Gauge,
    pub(crate) spans_dropped: Counter,
    cpu_seconds: Counter<f64, AtomicU64>,
    /// CPU seconds already added to `cpu_seconds` (it is a counter, advanced by the difference).
    cpu_seen: std::sync::Mutex<f64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
    cache_lookups: Family<RouteResultLabels, Counter>,
    /// The response cache's size, entries and evictions (kept current by the store).
    pub cache_store: crate::cache::StoreMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteResultLabels {
    route: String,
    result: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Which security signal a response was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecurityEvent {
    AuthFailure = 0,
    Forbidden = 1,
    NotFound = 2,
    RateLimited = 3,
}

impl SecurityEvent {
    /// Whether anomaly detection was told to count this kind.
    pub fn is_one_of(self, kinds: &[crate::config::model::SecurityEventKind]) -> bool {
        use crate::config::model::SecurityEventKind as Kind;
        kinds.contains(&match self {
            Self::AuthFailure => Kind::AuthFailure,
            Self::Forbidden => Kind::Forbidden,
            Self::NotFound => Kind::NotFound,
            Self::RateLimited => Kind::RateLimited,
        })
    }

    pub fn of_status(status: u16) -> Option<Self> {
        match status {
            401 => Some(Self::AuthFailure),
            403 => Some(Self::Forbidden),
            404 => Some(Self::NotFound),
            429 => Some(Self::RateLimited),
            _ => None,
        }
    }

    const NAMES: [&'static str; 4] = ["auth_failure", "forbidden", "not_found", "rate_limited"];
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(latency_histogram);
        let errors = Family::<RouteKindLabels, Counter>::default();
        let auth_failures = Family::<RouteReasonLabels, Counter>::default();
        let denials = Family::<RouteLabel, Counter>::default();
        let rate_limited = Family::<RouteRuleLabels, Counter>::default();
        let security_family = Family::<KindLabel, Counter>::default();
        let security = SecurityEvent::NAMES
            .map(|kind| security_family.get_or_create(&KindLabel { kind }).clone());
        let metrics = Self {
            requests,
            durations,
            errors,
            auth_failures,
            denials,
            rate_limited,
            security,
            in_flight: Gauge::default(),
            open_connections: Gauge::default(),
            upstream_in_flight: Family::default(),
            target_healthy: Family::default(),
            target_ejected: Family::default(),
            log_queue: Gauge::default(),
            log_capacity: Gauge::default(),
            log_dropped: Counter::default(),
            log_lines: Counter::default(),
            alerts_firing: Family::default(),
            alert_names: std::sync::Mutex::default(),
            reloads: Family::default(),
            spans_exported: Counter::default(),
            networks_tracked: Gauge::default(),
            spans_dropped: Counter::default(),
            cpu_seconds: Counter::default(),
            cpu_seen: std::sync::Mutex::new(0.0),
            resident_bytes: Gauge::default(),
            open_fds: Gauge::default(),
            start_time: Gauge::default(),
            cache_lookups: Family::default(),
            cache_store: crate::cache::StoreMetrics::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "portcullis_requests",
            "Requests answered, by route, method and status class",
            m.requests.clone(),
        );
        registry.register(
            "portcullis_request_duration_seconds",
            "Time from the request head to the end of the response body",
            m.durations.clone(),
        );
        registry.register(
            "portcullis_errors",
            "Errors by kind: the gateway's own error answers and upstream 5xx",
            m.errors.clone(),
        );
        registry.register(
            "portcullis_auth_failures",
            "Failed authentications by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "portcullis_authz_denials",
            "Requests authorization refused",
            m.denials.clone(),
        );
        registry.register(
            "portcullis_rate_limited",
            "Requests refused by a rate-limit rule",
            m.rate_limited.clone(),
        );
        registry.register(
            "portcullis_security_events",
            "Security signals: auth failures, 403s, 404s, 429s",
            security_family,
        );
        registry.register(
            "portcullis_in_flight_requests",
            "Requests being served",
            m.in_flight.clone(),
        );
        registry.register(
            "portcullis_open_connections",
            "Open client connections",
            m.open_connections.clone(),
        );
        registry.register(
            "portcullis_upstream_in_flight_requests",
            "Requests in flight to an upstream (connection pool use)",
            m.upstream_in_flight.clone(),
        );
        registry.register(
            "portcullis_upstream_target_healthy",
            "1 when the target passes its health checks",
            m.target_healthy.clone(),
        );
        registry.register(
            "portcullis_upstream_target_ejected",
            "1 while outlier detection has ejected the target",
            m.target_ejected.clone(),
        );
        registry.register(
            "portcullis_upstream_ejections",
            "Targets ejected by outlier detection",
            PROCESS.ejections.clone(),
        );
        registry.register(
            "portcullis_access_log_queue_length",
            "Access-log lines waiting for the writer",
            m.log_queue.clone(),
        );
        registry.register(
            "portcullis_access_log_queue_capacity",
            "Access-log lines that may wait",
            m.log_capacity.clone(),
        );
        registry.register(
            "portcullis_access_log_dropped",
            "Access-log lines dropped: the buffer was full, or writing failed",
            m.log_dropped.clone(),
        );
        registry.register(
            "portcullis_access_log_lines",
            "Access-log lines written",
            m.log_lines.clone(),
        );
        registry.register(
            "portcullis_alerts_firing",
            "1 while a built-in alert rule fires",
            m.alerts_firing.clone(),
        );
        registry.register(
            "portcullis_config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "portcullis_anomaly_networks_tracked",
            "Client networks anomaly detection is following (at most anomaly.max_networks)",
            m.networks_tracked.clone(),
        );
        registry.register(
            "portcullis_trace_spans_exported",
            "Spans the OTLP collector accepted",
            m.spans_exported.clone(),
        );
        registry.register(
            "portcullis_trace_spans_dropped",
            "Spans dropped: export queue full or the collector failed",
            m.spans_dropped.clone(),
        );
        registry.register(
            "portcullis_jwks_refreshes",
            "Remote key set fetches by result",
            PROCESS.jwks_refreshes.clone(),
        );
        registry.register(
            "portcullis_redis_errors",
            "Redis commands that failed or timed out",
            PROCESS.redis_errors.clone(),
        );
        registry.register(
            "portcullis_redis_command_duration_seconds",
            "Redis command and script latency",
            PROCESS.redis_duration.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time",
            m.cpu_seconds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory",
            m.resident_bytes.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            m.open_fds.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time since the Unix epoch",
            m.start_time.clone(),
        );
        registry.register(
            "portcullis_cache_lookups",
            "Cacheable requests by what the cache did: hit, miss, stale, revalidated, bypass",
            m.cache_lookups.clone(),
        );
        registry.register(
            "portcullis_cache_size_bytes",
            "Bytes the in-memory response cache holds",
            m.cache_store.bytes.clone(),
        );
        registry.register(
            "portcullis_cache_entries",
            "URLs the in-memory response cache holds",
            m.cache_store.entries.clone(),
        );
        registry.register(
            "portcullis_cache_evictions",
            "URLs evicted from the in-memory response cache to stay within its size",
            m.cache_store.evictions.clone(),
        );
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        metrics.start_time.set(start.as_secs_f64());
        Self {
            registry,
            ..metrics
        }
    }

    /// One route's cache lookup counters, in [`crate::cache::CacheStatus::ALL`] order.
    pub fn cache_outcomes(&self, route: &str) -> [Counter; 5] {
        crate::cache::CacheStatus::ALL.map(|status| {
            self.cache_lookups
                .get_or_create(&RouteResultLabels {
                    route: route.to_owned(),
                    result: status.as_str(),
                })
                .clone()
        })
    }

    /// The handles one route's requests update (resolved as they are first needed, then cached).
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            name: name.to_owned(),
            cells: Default::default(),
        }
    }

    /// Records one finished request on `route`.
    pub fn record(&self, route: &RouteMetrics, outcome: &Outcome<'_>) {
        let (requests, durations) = route.cell(self, outcome.method, outcome.status);
        requests.inc();
        durations.observe(outcome.duration.as_secs_f64());
        if let Some(kind) = outcome.error_kind {
            self.errors
                .get_or_create(&RouteKindLabels {
                    route: route.name.clone(),
                    kind,
                })
                .inc();
        }
        if let Some(reason) = outcome.auth_failure {
            self.auth_failures
                .get_or_create(&RouteReasonLabels {
                    route: route.name.clone(),
                    reason,
                })
                .inc();
        }
        if outcome.denied {
            self.denials
                .get_or_create(&RouteLabel {
                    route: route.name.clone(),
                })
                .inc();
        }
        if let Some(rule) = outcome.rate_limit_rule {
            self.rate_limited
                .get_or_create(&RouteRuleLabels {
                    route: route.name.clone(),
                    rule: rule.to_owned(),
                })
                .inc();
        }
        if let Some(event) = SecurityEvent::of_status(outcome.status) {
            self.security[event as usize].inc();
        }
    }

    /// Sets `portcullis_alerts_firing` to these values, and removes the series of alerts no
    /// longer configured (set first, removed after: a scrape never sees a current one missing).
    pub fn set_alert_series(&self, series: &[(String, i64)]) {
        for (alert, value) in series {
            self.alerts_firing
                .get_or_create(&AlertLabel {
                    alert: alert.clone(),
                })
                .set(*value);
        }
        let mut names = self.alert_names.lock().unwrap_or_else(|e| e.into_inner());
        for stale in names
            .iter()
            .filter(|n| !series.iter().any(|(a, _)| a == *n))
        {
            self.alerts_firing.remove(&AlertLabel {
                alert: stale.clone(),
            });
        }
        *names = series.iter().map(|(a, _)| a.clone()).collect();
    }

    /// Prometheus text exposition, process gauges read first.
    pub fn encode(&self) -> String {
        self.read_process();
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn read_process(&self) {
        // Linux: utime and stime are fields 14 and 15 of /proc/self/stat, in USER_HZ ticks (100
        // per second: fixed by the kernel's ABI); the name field may hold spaces, so fields are
        // counted from its closing parenthesis
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
                if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                    let total = (user + system) / 100.0;
                    let mut seen = self.cpu_seen.lock().unwrap_or_else(|e| e.into_inner());
                    if total > *seen {
                        self.cpu_seconds.inc_by(total - *seen);
                        *seen = total;
                    }
                }
            }
        }
        // resident memory as the kernel reports it, in kB (no page-size assumption)
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(kb) = status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<i64>()
                        .ok()
                })
            {
                self.resident_bytes.set(kb * 1024);
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(entries.count() as i64);
        }
    }
}

/// What the metrics need to know of a finished request.
pub struct Outcome<'a> {
    pub method: &'a Method,
    pub status: u16,
    pub duration: Duration,
    pub error_kind: Option<&'static str>,
    pub auth_failure: Option<&'static str>,
    pub denied: bool,
    pub rate_limit_rule: Option<&'a str>,
}

/// A route's cached handles: one (counter, histogram) pair per method and status class.
pub struct RouteMetrics {
    pub name: String,
    cells: [[OnceLock<(Counter, Histogram)>; 5]; 8],
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("name", &self.name)
            .finish()
    }
}

impl RouteMetrics {
    fn cell(&self, metrics: &Metrics, method: &Method, status: u16) -> &(Counter, Histogram) {
        let m = method_index(method);
        let s = status_class_index(status);
        self.cells[m][s].get_or_init(|| {
            let labels = RequestLabels {
                route: self.name.clone(),
                method: METHODS[m],
                status_class: STATUS_CLASSES[s],
            };
            (
                metrics.requests.get_or_create(&labels).clone(),
                metrics.durations.get_or_create(&labels).clone(),
            )
        })
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4, // 5xx, and 0 (no response was made)
    }
}

/// The bucket of [`LATENCY_BUCKETS`] a duration falls in (`len()` = above the last bound).
pub fn latency_bucket(duration: Duration) -> usize {
    let secs = duration.as_secs_f64();
    LATENCY_BUCKETS
        .iter()
        .position(|bound| secs <= *bound)
        .unwrap_or(LATENCY_BUCKETS.len())
}

/// A counter that is also read back (live statistics).
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_route_method_and_class() {
        let metrics = Metrics::new();
        let route = metrics.route("orders");
        for status in [200, 201, 404, 502] {
            metrics.record(
                &route,
                &Outcome {
                    method: &Method::GET,
                    status,
                    duration: Duration::from_millis(3),
                    error_kind: (status == 502).then_some("upstream_connect"),
                    auth_failure: None,
                    denied: false,
                    rate_limit_rule: None,
                },
            );
        }
        let text = metrics.encode();
        assert!(text.contains(
            "portcullis_requests_total{route=\"orders\",method=\"GET\",status_class=\"2xx\"} 2"
        ));
        assert!(text.contains(
            "portcullis_requests_total{route=\"orders\",method=\"GET\",status_class=\"4xx\"} 1"
        ));
        assert!(
            text.contains("portcullis_errors_total{route=\"orders\",kind=\"upstream_connect\"} 1")
        );
        assert!(text.contains("portcullis_security_events_total{kind=\"not_found\"} 1"));
        assert!(text.contains(
            "portcullis_request_duration_seconds_bucket{le=\"0.005\",route=\"orders\",method=\"GET\",status_class=\"2xx\"} 2"
        ), "{text}");
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn buckets_bound_durations() {
        assert_eq!(latency_bucket(Duration::from_micros(100)), 0);
        assert_eq!(latency_bucket(Duration::from_millis(3)), 3);
        assert_eq!(
            latency_bucket(Duration::from_secs(60)),
            LATENCY_BUCKETS.len()
        );
    }
}
