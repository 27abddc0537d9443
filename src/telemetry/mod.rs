//! Logging: `tracing` with JSON or human output, and the one access-log line per request.

use std::sync::OnceLock;

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::{config::model::LogFormat, pipeline::RequestCtx};

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

/// Writes the access-log line for a finished request (log target `access`).
pub fn access_log(ctx: &RequestCtx) {
    let duration_us = ctx.started.elapsed().as_micros() as u64;
    let upstream_us = ctx.upstream_latency.map(|d| d.as_micros() as u64);
    tracing::info!(
        target: "access",
        request_id = ctx.request_id.to_str().unwrap_or_default(),
        client_ip = %ctx.client_ip,
        peer = %ctx.peer,
        listener = &*ctx.listener,
        tls = ctx.tls,
        method = ctx.method.as_str(),
        host = &*ctx.host,
        path = &*ctx.path,
        protocol = ?ctx.version,
        status = ctx.status,
        bytes_out = ctx.bytes_out,
        duration_us,
        upstream_us,
        route = ctx.route.as_deref(),
        upstream = ctx.upstream.as_deref(),
        upstream_target = ctx.target.as_deref(),
        retries = ctx.retries,
        error = ctx.error,
        aborted = ctx.response_aborted,
        user_agent = ctx.user_agent.as_ref().and_then(|v| v.to_str().ok()),
        auth_subject = ctx.identity.as_ref().map(|i| &*i.subject),
        auth_method = ctx.identity.as_ref().map(|i| i.method),
        auth_provider = ctx.identity.as_ref().map(|i| &*i.provider),
        auth_failure = ctx.auth_failure,
        authz = ctx
            .authorization
            .as_ref()
            .map(|d| if d.allowed { "allow" } else { "deny" }),
        authz_reason = ctx.authorization.as_ref().map(|d| tracing::field::display(&d.reason)),
        ratelimit_rule = ctx.rate_limit.outcome.as_ref().map(|o| &*o.rule.name),
        ratelimit = ctx
            .rate_limit
            .outcome
            .as_ref()
            .map(|o| if o.refused { "refuse" } else { "allow" }),
        ratelimit_shadow_refusal = ctx.rate_limit.shadow_refusal.as_deref(),
        "request"
    );
}
