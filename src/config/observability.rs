//! The `observability` section: access log, metrics, tracing, alerts, anomaly detection and the
//! dashboard. Part of the raw model (see [`super::model`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units::{ByteSize, HumanDuration};

/// What the gateway tells operators: logs, metrics, traces, alerts, the dashboard.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    /// One JSON line per request.
    pub access_log: AccessLogConfig,
    /// Prometheus metrics on the admin listener (`/metrics`).
    pub metrics: MetricsConfig,
    /// W3C trace context propagation.
    pub tracing: TracingConfig,
    /// How often the live statistics (dashboard charts, alert rules, anomaly detection) take a
    /// sample, and how much history they keep.
    pub sampling: SamplingConfig,
    /// Alert rules over the golden signals, and where notifications go.
    pub alerts: AlertsConfig,
    /// Security signals (failed logins, 403s, 404 scans, 429s) per client network: a sudden
    /// increase raises an alert and tightens the network's rate limits.
    pub anomaly: Option<AnomalyConfig>,
    /// The built-in dashboard on the admin listener (`/dashboard`).
    pub dashboard: DashboardConfig,
}

/// The access log.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Write one line per request.
    pub enabled: bool,
    /// `stdout`, or a file path (rotated by size). Read at start only.
    pub output: String,
    /// With a file: rotate when it reaches this size (`app.log` → `app.log.1` …).
    pub max_file_size: ByteSize,
    /// With a file: rotated files kept.
    pub max_files: u32,
    /// Lines that may wait for the writer; when full, lines are dropped and counted
    /// (`portcullis_access_log_dropped_total`), never waited for. Read at start only.
    pub buffer: usize,
    /// Fraction (0–1) of successful (< 400) requests logged. Errors and denials are always
    /// logged.
    pub sample_success: f64,
    /// Query parameters whose values are replaced by `[redacted]`, besides the built-in
    /// `access_token`, `token`, `id_token`, `refresh_token`, `api_key`, `apikey`, `key`,
    /// `password`, `secret`, `client_secret`, `code`, `signature`, `sig`.
    pub redact_query: Vec<String>,
    /// Request headers copied into the line (`request_headers`), by name. Credential headers
    /// (`authorization`, `cookie`, API-key and DPoP headers) are always redacted.
    pub request_headers: Vec<String>,
    /// Response headers copied into the line (`response_headers`); `set-cookie` is redacted.
    pub response_headers: Vec<String>,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            output: "stdout".into(),
            max_file_size: ByteSize::mib(100),
            max_files: 5,
            buffer: 16_384,
            sample_success: 1.0,
            redact_query: Vec::new(),
            request_headers: Vec::new(),
            response_headers: Vec::new(),
        }
    }
}

/// Prometheus metrics.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` on the admin listener.
    pub enabled: bool,
    /// Require the admin token for `/metrics` too (by default scrapers need none; the admin
    /// listener binds to loopback).
    pub require_token: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            require_token: false,
        }
    }
}

/// Trace context.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Send `traceparent` to upstreams: the client's trace continued with the gateway's span, or
    /// a new trace when the request has none (or an invalid one).
    pub propagate: bool,
    /// Continue traces (`traceparent`, `tracestate`) from any client (`true`), or only from
    /// `server.trusted_proxies` (`false`, the default: other clients' requests start a new trace,
    /// so a client cannot pick trace ids or force sampling).
    pub trust_client_traces: bool,
    /// Fraction (0–1) of new traces sampled (a continued trace keeps its caller's decision).
    pub sample_ratio: f64,
    /// Export spans of the gateway's phases over OTLP to a collector. Off by default. Read at
    /// start only.
    pub otlp: Option<OtlpConfig>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            propagate: true,
            trust_client_traces: false,
            sample_ratio: 1.0,
            otlp: None,
        }
    }
}

/// An OTLP/HTTP (protobuf) trace exporter.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces` (plain HTTP:
    /// run the collector beside the gateway).
    pub endpoint: String,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Per export call.
    #[serde(default = "default_otlp_timeout")]
    pub timeout: HumanDuration,
    /// Spans that may wait for export; more are dropped (and counted).
    #[serde(default = "default_otlp_queue")]
    pub max_queue: usize,
}

fn default_service_name() -> String {
    "portcullis".into()
}

fn default_otlp_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

fn default_otlp_queue() -> usize {
    8192
}

/// Sampling of the live statistics.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Time between samples (one dashboard point, one alert evaluation). Read at start only.
    pub interval: HumanDuration,
    /// History kept (dashboard charts, alert windows and baselines must fit in it).
    /// Read at start only.
    pub history: HumanDuration,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::from_secs(2),
            history: HumanDuration::from_secs(30 * 60),
        }
    }
}

/// Alerting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The rules.
    pub rules: Vec<AlertRuleConfig>,
    /// Where firing and resolved notifications are `POST`ed (JSON). Every notification is also
    /// logged (target `alert`).
    pub webhooks: Vec<WebhookConfig>,
}

/// One alert rule: a signal over a window, compared with a threshold or its own baseline.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertRuleConfig {
    /// Unique name (shown in notifications, `portcullis_alerts_firing{alert=…}`).
    pub name: String,
    /// What is measured over `window`.
    pub signal: AlertSignal,
    /// One route (by name); all routes when absent.
    #[serde(default)]
    pub route: Option<String>,
    /// Fire when the signal is above this value (ratios 0–1, latency in seconds, rates per
    /// second, counts as counted).
    #[serde(default)]
    pub above: Option<f64>,
    /// Fire when the signal is more than this many times its baseline (the mean of the
    /// `baseline` before the window): "a sudden rise".
    #[serde(default)]
    pub rise_over_baseline: Option<f64>,
    /// The period before the window that `rise_over_baseline` compares with.
    #[serde(default = "default_baseline")]
    pub baseline: HumanDuration,
    /// The window the signal is measured over.
    #[serde(default = "default_window")]
    pub window: HumanDuration,
    /// How long the condition must hold before the alert fires (0: at once).
    #[serde(default, rename = "for")]
    pub for_: Option<HumanDuration>,
    /// Ratio and latency signals are not judged on fewer requests than this in the window.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// `warning` or `critical` (passed on in notifications).
    #[serde(default)]
    pub severity: Severity,
}

fn default_baseline() -> HumanDuration {
    HumanDuration::from_secs(15 * 60)
}

fn default_window() -> HumanDuration {
    HumanDuration::from_secs(60)
}

fn default_min_requests() -> u64 {
    10
}

/// A measurable signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertSignal {
    /// Requests per second.
    RequestRate,
    /// 5xx responses / all responses.
    ErrorRatio,
    /// 99th percentile of the total latency, seconds.
    LatencyP99,
    /// 50th percentile of the total latency, seconds.
    LatencyP50,
    /// Requests in flight (gateway-wide), at the end of the window.
    InFlight,
    /// Open client connections (gateway-wide), at the end of the window.
    Connections,
    /// Fill of the access-log buffer, 0–1, at the end of the window.
    LogQueueFill,
    /// Failed authentications per second.
    AuthFailureRate,
    /// Authorization denials per second.
    DeniedRate,
    /// Rate-limited (429) responses per second.
    RateLimitedRate,
}

/// How urgent an alert is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Warning,
    Critical,
}

/// A webhook that receives alert notifications.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://…` (or `http://` to a loopback address).
    pub url: String,
    /// Sent as `Authorization: Bearer …` (use `"${ENV}"`).
    #[serde(default)]
    pub token: Option<String>,
    /// Per attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: HumanDuration,
    /// Attempts after the first (at most 10), with doubling back-off from 500 ms (at most 30 s).
    #[serde(default = "default_webhook_retries")]
    pub retries: u32,
}

fn default_webhook_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

fn default_webhook_retries() -> u32 {
    3
}

/// Anomaly detection over the security signals, per client network.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Network size clients are grouped by (IPv4 / IPv6 prefix lengths; the defaults, /24 and
    /// /56, match `rate_limits.adaptive.network`, whose scores anomalies feed).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Which security events count: `auth_failure` (401), `forbidden` (403), `not_found` (404),
    /// `rate_limited` (429). Default: the first three (429s would count the refusals anomaly
    /// detection's own penalty causes); `[auth_failure]` watches failed logins alone.
    pub events: Vec<SecurityEventKind>,
    /// Events are counted over this window.
    pub window: HumanDuration,
    /// A network is anomalous with at least this many events in the window …
    pub min_events: u64,
    /// … and more than this many times its own baseline rate (events per window, averaged over
    /// the history before the window; a network never seen before has a baseline of zero).
    pub rise_over_baseline: f64,
    /// Points added to the network's adaptive rate-limit score when it turns anomalous (needs
    /// `rate_limits.adaptive`); 0 to only alert.
    pub adaptive_points: f64,
    /// Networks tracked at most (when more send events, the quietest are forgotten first).
    pub max_networks: usize,
    /// `warning` or `critical`.
    pub severity: Severity,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            events: vec![
                SecurityEventKind::AuthFailure,
                SecurityEventKind::Forbidden,
                SecurityEventKind::NotFound,
            ],
            window: HumanDuration::from_secs(60),
            min_events: 50,
            rise_over_baseline: 5.0,
            adaptive_points: 20.0,
            max_networks: 10_000,
            severity: Severity::Warning,
        }
    }
}

/// A security signal anomaly detection can count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecurityEventKind {
    /// 401: a failed authentication.
    AuthFailure,
    /// 403: an authorization denial.
    Forbidden,
    /// 404: no route (scans).
    NotFound,
    /// 429: refused by a rate limit.
    RateLimited,
}

/// The dashboard.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// Serve `/dashboard` and `/dashboard/data` on the admin listener (the data needs the admin
    /// token; the page asks for it).
    pub enabled: bool,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Request and response bodies in the access log, for one route (`routes[].capture_payload`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CapturePayloadConfig {
    /// Capture the request body.
    pub request: bool,
    /// Capture the response body.
    pub response: bool,
    /// Bytes kept of each body; a longer body is logged as its size only.
    pub max_bytes: ByteSize,
    /// JSON field and form parameter names whose values are redacted, besides the built-in
    /// `password`, `passwd`, `secret`, `token`, `access_token`, `refresh_token`, `id_token`,
    /// `client_secret`, `api_key`, `apikey`, `authorization`, `cookie`, `private_key`,
    /// `card_number`, `cvv`, `ssn`.
    pub redact_fields: Vec<String>,
}

impl Default for CapturePayloadConfig {
    fn default() -> Self {
        Self {
            request: true,
            response: true,
            max_bytes: ByteSize::kib(4),
            redact_fields: Vec::new(),
        }
    }
}
