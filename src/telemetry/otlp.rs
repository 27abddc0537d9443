//! Trace export over OTLP/HTTP: one server span per sampled request, with child spans for the
//! phases that ran (rate limits, authentication, authorization, the upstream call).
//!
//! Spans are built when a request finishes, from the timings the request recorded, and handed
//! to a bounded queue; a task sends them in batches with the OpenTelemetry OTLP exporter. A slow
//! or absent collector costs dropped spans (counted), never request latency.

use std::{
    borrow::Cow,
    time::{Duration, Instant, SystemTime},
};

use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::{config::model::OtlpConfig, pipeline::RequestCtx};

const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The queue to the export task. Lives as long as the gateway.
#[derive(Debug)]
pub struct TraceExport {
    sender: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    /// Spans dropped because the queue was full or the collector failed.
    dropped: Counter,
}

impl TraceExport {
    /// Builds the exporter and starts its task on the current runtime.
    pub fn start(
        config: &OtlpConfig,
        metrics: &Metrics,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout.0)
            .build()
            .map_err(|error| format!("cannot build the OTLP exporter: {error}"))?;
        exporter.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .build(),
        );
        let (sender, mut receiver) = mpsc::channel::<SpanData>(config.max_queue.max(1));
        let exported = metrics.spans_exported.clone();
        let dropped = metrics.spans_dropped.clone();
        let failed = dropped.clone();
        let endpoint = config.endpoint.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                // wait for the first span, then gather what arrives within the flush period
                let Some(first) = receiver.recv().await else {
                    return;
                };
                batch.push(first);
                let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(span)) => batch.push(span),
                        Ok(None) | Err(_) => break,
                    }
                }
                let spans = batch.len() as u64;
                match exporter.export(std::mem::take(&mut batch)).await {
                    Ok(()) => {
                        exported.inc_by(spans);
                    }
                    Err(error) => {
                        failed.inc_by(spans);
                        tracing::warn!(%endpoint, %error, spans, "OTLP export failed; spans dropped")
                    }
                }
            }
        });
        Ok((
            Self {
                sender,
                scope: InstrumentationScope::builder("portcullis")
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
                dropped,
            },
            task,
        ))
    }

    /// Queues the spans of a finished, sampled request.
    pub fn record(&self, ctx: &RequestCtx) {
        let Some(trace) = ctx.trace.filter(|t| t.sampled) else {
            return;
        };
        // the request's instants, placed on the wall clock
        let now = Instant::now();
        let wall_now = SystemTime::now();
        let wall = |at: Instant| wall_now - now.saturating_duration_since(at);
        let trace_id = TraceId::from_bytes(trace.trace_id);
        let server_span = SpanId::from_bytes(trace.server_span_id);
        let context = |span: [u8; 8]| {
            SpanContext::new(
                trace_id,
                SpanId::from_bytes(span),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            )
        };
        let status = if ctx.status >= 500 || ctx.status == 0 {
            Status::error(ctx.error.unwrap_or("upstream error"))
        } else {
            Status::Unset
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", ctx.method.as_str().to_owned()),
            KeyValue::new("url.path", ctx.path.to_string()),
            KeyValue::new("http.response.status_code", i64::from(ctx.status)),
            KeyValue::new("client.address", ctx.client_ip.to_string()),
            KeyValue::new(
                "portcullis.request_id",
                ctx.request_id.to_str().unwrap_or_default().to_owned(),
            ),
        ];
        if let Some(route) = &ctx.route {
            attributes.push(KeyValue::new("http.route", route.to_string()));
        }
        if let Some(reason) = ctx.auth_failure {
            attributes.push(KeyValue::new("portcullis.auth_failure", reason));
        }
        if let Some(decision) = &ctx.authorization {
            attributes.push(KeyValue::new(
                "portcullis.authz",
                if decision.allowed { "allow" } else { "deny" },
            ));
        }
        let name = match &ctx.route {
            Some(route) => format!("{} {route}", ctx.method),
            None => ctx.method.to_string(),
        };
        let mut spans = vec![self.span(
            context(trace.server_span_id),
            trace.parent_id.map_or(SpanId::INVALID, SpanId::from_bytes),
            trace.parent_id.is_some(),
            SpanKind::Server,
            Cow::Owned(name),
            (wall(ctx.started), wall_now),
            attributes,
            status,
        )];
        for phase in ctx.phases.iter().flatten() {
            let (kind, span_id, mut attributes) = if phase.name == "upstream" {
                // its id is the parent the upstream was told about in `traceparent`
                let mut attributes = Vec::new();
                if let Some(target) = &ctx.target {
                    attributes.push(KeyValue::new("server.address", target.to_string()));
                }
                attributes.push(KeyValue::new("portcullis.retries", i64::from(ctx.retries)));
                (SpanKind::Client, trace.span_id, attributes)
            } else {
                (
                    SpanKind::Internal,
                    super::trace::random_nonzero::<8>(),
                    Vec::new(),
                )
            };
            attributes.push(KeyValue::new("portcullis.phase", phase.name));
            spans.push(self.span(
                context(span_id),
                server_span,
                false,
                kind,
                Cow::Borrowed(phase.name),
                (wall(phase.started), wall(phase.ended)),
                attributes,
                Status::Unset,
            ));
        }
        for span in spans {
            if self.sender.try_send(span).is_err() {
                self.dropped.inc();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        span_context: SpanContext,
        parent_span_id: SpanId,
        parent_span_is_remote: bool,
        span_kind: SpanKind,
        name: Cow<'static, str>,
        (start_time, end_time): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context,
            parent_span_id,
            parent_span_is_remote,
            span_kind,
            name,
            start_time,
            end_time,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}
