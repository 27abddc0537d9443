//! What the gateway tells operators: the process log (`tracing`), the access log, Prometheus
//! metrics, trace context, live statistics for the dashboard, alerts and anomaly detection.
//!
//! [`Telemetry`] lives as long as the gateway (a reload keeps counts, histories and alert
//! states); [`Observer`] is its view compiled from one config, held by the snapshot. A request
//! touches it twice: [`Observer::begin`] when it arrives, [`Observer::finish`] when its response
//! has been sent (metrics, live tallies, the log line).

use std::sync::OnceLock;

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

pub mod access_log;
pub mod alerts;
pub mod anomaly;
pub mod metrics;
pub mod otlp;
pub mod payload;
pub mod redact;
pub mod stats;
pub mod trace;

use std::{
    sync::Arc,
    time::{Instant, SystemTime},
};

use crate::{
    config::model::{AnomalyConfig, LogFormat, ObservabilityConfig},
    pipeline::RequestCtx,
    policy::ratelimit::Adaptive,
};
use access_log::{AccessLogPolicy, AccessLogSink};
use alerts::{AlertBook, AlertRule, Notification, Notifier, Webhook};
use anomaly::NetworkSignals;
use metrics::{Metrics, Outcome, RouteMetrics, SecurityEvent};
use stats::{LiveStats, RouteTallies, Tallied, TopClients};

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the global subscriber once; `RUST_LOG` overrides the configured level.
/// Logging settings are read at start only (changing them needs a restart).
pub fn init(format: LogFormat, level: &str) {
    INSTALLED.get_or_init(|| {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let registry = tracing_subscriber::registry().with(filter);
        let result = match format {
            LogFormat::Json => registry
                .with(
                    fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_writer(std::io::stdout),
                )
                .try_init(),
            LogFormat::Human => registry
                .with(fmt::layer().with_writer(std::io::stdout))
                .try_init(),
        };
        // a test harness may have installed one already; that is fine
        let _ = result;
    });
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the access log `{output}`: {source}")]
    AccessLog {
        output: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    TraceExport(String),
}

/// Everything observed, kept for the gateway's lifetime.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub stats: LiveStats,
    pub clients: TopClients,
    pub networks: NetworkSignals,
    pub alerts: AlertBook,
    pub access_log: AccessLogSink,
    /// OTLP trace export (`observability.tracing.otlp`), when configured at start.
    pub traces: Option<otlp::TraceExport>,
    export_task: Option<tokio::task::JoinHandle<()>>,
    pub started: Instant,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(task) = &self.export_task {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Telemetry {
    /// Starts the access-log writer and the trace exporter as configured (their settings are
    /// read here only). Call inside a tokio runtime.
    pub fn start(config: &ObservabilityConfig) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        // started even when the log is off, so a reload can turn it on
        let access_log =
            AccessLogSink::start(&config.access_log, metrics.clone()).map_err(|source| {
                StartError::AccessLog {
                    output: config.access_log.output.clone(),
                    source,
                }
            })?;
        let mut telemetry = Self::with_sink(config, metrics, access_log);
        if let Some(otlp) = &config.tracing.otlp {
            let (traces, task) = otlp::TraceExport::start(otlp, &telemetry.metrics)
                .map_err(StartError::TraceExport)?;
            telemetry.traces = Some(traces);
            telemetry.export_task = Some(task);
        }
        Ok(telemetry)
    }

    /// Without an access-log writer: for tools that compile a config without serving it.
    pub fn inert() -> Self {
        Self::with_sink(
            &ObservabilityConfig::default(),
            Arc::new(Metrics::new()),
            AccessLogSink::disabled(),
        )
    }

    fn with_sink(
        config: &ObservabilityConfig,
        metrics: Arc<Metrics>,
        access_log: AccessLogSink,
    ) -> Self {
        Self {
            metrics,
            stats: LiveStats::new(config.sampling.interval.0, config.sampling.history.0),
            clients: TopClients::default(),
            networks: NetworkSignals::default(),
            alerts: AlertBook::default(),
            access_log,
            traces: None,
            export_task: None,
            started: Instant::now(),
        }
    }
}

/// Holds one request in the in-flight gauge.
#[derive(Debug)]
pub struct InFlightGauge(prometheus_client::metrics::gauge::Gauge);

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A route's handles: cached metric cells and live tallies.
#[derive(Debug)]
pub struct RouteObserver {
    metrics: RouteMetrics,
    tallies: Arc<RouteTallies>,
}

/// The telemetry as one config wants it (compiled per snapshot).
#[derive(Debug)]
pub struct Observer {
    pub telemetry: Arc<Telemetry>,
    pub access_log: AccessLogPolicy,
    pub metrics_enabled: bool,
    pub metrics_require_token: bool,
    pub dashboard_enabled: bool,
    pub propagate_traces: bool,
    pub trust_client_traces: bool,
    pub trace_sample_ratio: f64,
    pub anomaly: Option<AnomalyConfig>,
    pub alert_rules: Vec<AlertRule>,
    pub webhooks: Arc<Vec<Arc<Webhook>>>,
    /// The adaptive limiter anomalous networks are handed to.
    pub adaptive: Option<Arc<Adaptive>>,
    unrouted: Arc<RouteObserver>,
    /// The config's route names (live statistics of other routes are dropped).
    routes: std::collections::HashSet<String>,
}

impl Observer {
    /// Compiles the config's view; `access_log` and `webhooks` were compiled by the caller
    /// (they need other sections of the config and report errors with their paths).
    pub fn new(
        telemetry: Arc<Telemetry>,
        config: &ObservabilityConfig,
        access_log: AccessLogPolicy,
        webhooks: Vec<Arc<Webhook>>,
        adaptive: Option<Arc<Adaptive>>,
        routes: std::collections::HashSet<String>,
    ) -> Self {
        let alert_rules = config
            .alerts
            .rules
            .iter()
            .map(|rule| AlertRule::compile(rule, &telemetry.stats))
            .collect();
        let unrouted = Arc::new(RouteObserver {
            metrics: telemetry.metrics.route(metrics::NO_ROUTE),
            tallies: telemetry.stats.route(metrics::NO_ROUTE),
        });
        Self {
            access_log,
            metrics_enabled: config.metrics.enabled,
            metrics_require_token: config.metrics.require_token,
            dashboard_enabled: config.dashboard.enabled,
            propagate_traces: config.tracing.propagate,
            trust_client_traces: config.tracing.trust_client_traces,
            trace_sample_ratio: config.tracing.sample_ratio.clamp(0.0, 1.0),
            anomaly: config.anomaly.clone(),
            alert_rules,
            webhooks: Arc::new(webhooks),
            adaptive,
            unrouted,
            routes,
            telemetry,
        }
    }

    /// Whether a request's phases are timed (its trace is sampled and exported).
    pub fn times_phases(&self, ctx: &RequestCtx) -> bool {
        self.telemetry.traces.is_some() && ctx.trace.is_some_and(|t| t.sampled)
    }

    /// The handles for a route (its tallies survive reloads, by name).
    pub fn route(&self, name: &str) -> Arc<RouteObserver> {
        Arc::new(RouteObserver {
            metrics: self.telemetry.metrics.route(name),
            tallies: self.telemetry.stats.route(name),
        })
    }

    /// A request arrived: counted in flight until the guard is dropped (with its record, also
    /// when the client goes away mid-request).
    pub fn begin(&self) -> InFlightGauge {
        self.telemetry.metrics.in_flight.inc();
        InFlightGauge(self.telemetry.metrics.in_flight.clone())
    }

    /// A request's response has been sent (or abandoned): metrics, tallies, the log line.
    pub fn finish(&self, ctx: &RequestCtx) {
        let telemetry = &*self.telemetry;
        let security_event = SecurityEvent::of_status(ctx.status);
        if self.metrics_enabled {
            let route = ctx.route_observer.as_deref().unwrap_or(&self.unrouted);
            let duration = ctx.started.elapsed();
            let denied = ctx.authorization.as_ref().is_some_and(|d| !d.allowed);
            // the gateway's own answers by their code; the upstream's errors by class
            let error_kind = ctx.error.or(match ctx.status {
                500.. => Some("upstream_5xx"),
                400..=499 => Some("upstream_4xx"),
                _ => None,
            });
            telemetry.metrics.record(
                &route.metrics,
                &Outcome {
                    method: &ctx.method,
                    status: ctx.status,
                    duration,
                    error_kind,
                    auth_failure: ctx.auth_failure,
                    denied,
                    rate_limit_rule: ctx
                        .rate_limit
                        .outcome
                        .as_ref()
                        .filter(|o| o.refused)
                        .map(|o| &*o.rule.name),
                },
            );
            route.tallies.add(&Tallied {
                status: ctx.status,
                duration,
                auth_failure: ctx.auth_failure.is_some(),
                denied,
            });
            telemetry.clients.record(ctx.client_ip);
        }
        if let (Some(anomaly), Some(event)) = (&self.anomaly, security_event) {
            if event.is_one_of(&anomaly.events) {
                telemetry.networks.record(ctx.client_ip, anomaly);
            }
        }
        if let Some(traces) = &telemetry.traces {
            traces.record(ctx);
        }
        if self.access_log.should_log(ctx) {
            let line = self.access_log.format(ctx);
            telemetry.access_log.send(line, &telemetry.metrics);
        }
    }
}

/// The background work of the live statistics: a sample every interval, then alert rules and
/// anomaly detection on it. `current` reads the observer of the current config.
pub struct Sampler {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Sampler {
    /// Starts on the current runtime.
    pub fn start(current: impl Fn() -> Arc<Observer> + Send + 'static) -> Self {
        let (notifier, delivery) = Notifier::start();
        let interval = current().telemetry.stats.interval;
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                sample_once(&current(), &notifier);
            }
        });
        Self {
            tasks: vec![task, delivery],
        }
    }
}

/// Anomalous networks become notifications (at most this many per sample; the rest are
/// counted in one log line) and tighter adaptive limits.
const MAX_ANOMALY_NOTIFICATIONS: usize = 20;

fn judge_networks(observer: &Observer, anomaly: &AnomalyConfig) -> Vec<Notification> {
    let telemetry = &*observer.telemetry;
    let window = telemetry.stats.samples_in(anomaly.window.0);
    let mut notifications = Vec::new();
    let mut unsent = 0usize;
    for finding in telemetry.networks.sample(anomaly, window) {
        let network = format!("{}/{}", finding.network, finding.prefix);
        let name = format!("anomaly:{network}");
        let raised = finding.change != anomaly::Change::Calmed;
        if raised && anomaly.adaptive_points > 0.0 {
            // raised, or still going after another window: the network's limits tighten (again)
            if let Some(adaptive) = &observer.adaptive {
                adaptive.penalize_network(finding.network, anomaly.adaptive_points);
            }
        }
        if finding.change == anomaly::Change::Persisting {
            continue;
        }
        let started_at = telemetry.alerts.started_at(&name);
        let kinds: Vec<String> = anomaly
            .events
            .iter()
            .filter_map(|kind| serde_json::to_value(kind).ok()?.as_str().map(str::to_owned))
            .collect();
        let notification = Notification {
            alert: name,
            state: if raised { "firing" } else { "resolved" },
            severity: anomaly.severity,
            summary: format!(
                "{} security events ({}) from {network} in {} (baseline {:.1})",
                finding.events,
                kinds.join(", "),
                anomaly.window,
                finding.baseline
            ),
            value: finding.events as f64,
            threshold: (anomaly.rise_over_baseline * finding.baseline)
                .max(anomaly.min_events as f64),
            route: None,
            network: Some(network),
            started_at: started_at.unwrap_or_else(|| alerts::rfc3339(SystemTime::now())),
            ended_at: (!raised).then(|| alerts::rfc3339(SystemTime::now())),
        };
        telemetry.alerts.set_external(&notification);
        if notifications.len() < MAX_ANOMALY_NOTIFICATIONS {
            notifications.push(notification);
        } else {
            unsent += 1;
        }
    }
    if unsent > 0 {
        tracing::warn!(
            target: "alert",
            unsent,
            "more networks changed state than one sample notifies; see /alerts and the dashboard"
        );
    }
    notifications
}

/// One sample, evaluation and anomaly pass.
pub fn sample_once(observer: &Observer, notifier: &Notifier) {
    let telemetry = &*observer.telemetry;
    let metrics = &telemetry.metrics;
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    metrics.log_queue.set(telemetry.access_log.queued());
    telemetry
        .stats
        .retain_routes(|name| name == metrics::NO_ROUTE || observer.routes.contains(name));
    telemetry.stats.sample(
        now_ms,
        metrics.in_flight.get(),
        metrics.open_connections.get(),
        telemetry.access_log.fill(),
    );
    // top clients: a half-life of one minute
    telemetry
        .clients
        .decay(0.5f64.powf(telemetry.stats.interval.as_secs_f64() / 60.0));
    let mut notifications = telemetry
        .alerts
        .evaluate(&observer.alert_rules, &telemetry.stats);
    match &observer.anomaly {
        Some(anomaly) => notifications.extend(judge_networks(observer, anomaly)),
        None => {
            // turned off by a reload: what was anomalous resolves
            telemetry.networks.clear();
            for alert in telemetry.alerts.firing() {
                let Some(network) = alert.name.strip_prefix("anomaly:") else {
                    continue;
                };
                let notification = Notification {
                    alert: alert.name.clone(),
                    state: "resolved",
                    severity: alert.severity,
                    summary: format!("anomaly detection turned off; {network} no longer watched"),
                    value: alert.value,
                    threshold: alert.threshold,
                    route: None,
                    network: Some(network.to_owned()),
                    started_at: alert.since.clone(),
                    ended_at: Some(alerts::rfc3339(SystemTime::now())),
                };
                telemetry.alerts.set_external(&notification);
                notifications.push(notification);
            }
        }
    }
    metrics
        .networks_tracked
        .set(telemetry.networks.tracked() as i64);
    let firing = telemetry.alerts.firing();
    // rebuilt each time: a rule removed by a reload leaves no stale series behind
    metrics.alerts_firing.clear();
    for rule in &observer.alert_rules {
        let on = firing.iter().any(|f| f.name == rule.name);
        metrics
            .alerts_firing
            .get_or_create(&metrics::AlertLabel {
                alert: rule.name.clone(),
            })
            .set(i64::from(on));
    }
    // anomalies share one series (a label per network would be unbounded)
    metrics
        .alerts_firing
        .get_or_create(&metrics::AlertLabel {
            alert: "anomaly".into(),
        })
        .set(
            firing
                .iter()
                .filter(|f| f.name.starts_with("anomaly:"))
                .count() as i64,
        );
    for notification in notifications {
        notifier.notify(notification, observer.webhooks.clone());
    }
}
