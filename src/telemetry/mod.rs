//! What the gateway tells operators: the process log (`tracing`), the access log, Prometheus
//! metrics, trace context, live statistics for the dashboard, alerts and anomaly detection.
//!
//! [`Telemetry`] lives as long as the gateway (a reload keeps counts, histories and alert
//! states); [`Observer`] is its view compiled from one config, held by the snapshot. A request
//! touches it twice: [`Observer::begin`] when it arrives, [`Observer::finish`] when its response
//! has been sent (metrics, live tallies, the log line).

pub mod access_log;
pub mod alerts;
pub mod anomaly;
mod log;
pub mod metrics;
pub mod otlp;
pub mod payload;
pub mod redact;
mod sampler;
pub mod stats;
pub mod trace;

use std::{sync::Arc, time::Instant};

pub use log::init;
pub use sampler::{sample_once, Sampler};

use crate::{
    config::model::{AnomalyConfig, ObservabilityConfig},
    pipeline::RequestCtx,
    policy::ratelimit::Adaptive,
};
use access_log::{AccessLogPolicy, AccessLogSink};
use alerts::{AlertBook, AlertRule, Webhook};
use anomaly::NetworkSignals;
use metrics::{Metrics, Outcome, RouteMetrics, SecurityEvent};
use stats::{LiveStats, RouteTallies, Tallied, TopClients};

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

impl Telemetry {
    /// Starts the access-log writer and the trace exporter as configured (their settings are
    /// read here only). Call inside a tokio runtime.
    pub fn start(config: &ObservabilityConfig) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        // started even when the log is off, so a reload can turn it on; an output that cannot
        // be opened stops the start only when the log is on
        let access_log = match AccessLogSink::start(&config.access_log, metrics.clone()) {
            Ok(sink) => sink,
            Err(source) if config.access_log.enabled => {
                return Err(StartError::AccessLog {
                    output: config.access_log.output.clone(),
                    source,
                })
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    output = &*config.access_log.output,
                    "the access log (off) cannot be opened; turning it on will need a restart"
                );
                AccessLogSink::disabled()
            }
        };
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
            let duration = ctx
                .upgraded_at
                .map_or_else(|| ctx.started.elapsed(), |at| at - ctx.started);
            let denied = ctx.authorization.as_ref().is_some_and(|d| !d.allowed);
            // the gateway's own answers by their code; the upstream's errors by class
            let forwarded = ctx.upstream_latency.is_some();
            let error_kind = ctx.error.or(match ctx.status {
                500.. if forwarded => Some("upstream_5xx"),
                400..=499 if forwarded => Some("upstream_4xx"),
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
