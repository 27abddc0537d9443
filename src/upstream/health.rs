//! Active health checks: a task per target sends `GET <path>` on an interval; consecutive passes
//! and failures beyond the thresholds flip the target's health. Targets start healthy, so a fresh
//! gateway serves at once; a dead target is taken out after `unhealthy_threshold` failed checks.

use std::sync::Arc;

use http::{header, HeaderValue, Request};
use tokio::task::JoinHandle;

use super::Upstream;
use crate::pipeline::UpstreamBody;

/// The running checks of one snapshot; dropping it stops them (a reload starts a new set, while
/// the targets' health itself is kept in the registry).
#[derive(Debug, Default)]
pub struct HealthChecks {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl HealthChecks {
    /// Starts checks for every target of every upstream that configures them. Must run inside a
    /// tokio runtime (the control runtime).
    pub fn start<'a>(upstreams: impl IntoIterator<Item = &'a Arc<Upstream>>) -> Self {
        let mut tasks = Vec::new();
        for upstream in upstreams {
            if upstream.health_check.is_none() {
                // checks were removed (or never configured): nothing will ever mark these
                // targets healthy again, so do it now
                for target in upstream.targets.iter() {
                    target.state.set_healthy(true);
                }
                continue;
            }
            for index in 0..upstream.targets.len() {
                tasks.push(tokio::spawn(check_target(upstream.clone(), index)));
            }
        }
        Self { tasks }
    }
}

async fn check_target(upstream: Arc<Upstream>, index: usize) {
    let Some(config) = upstream.health_check.clone() else {
        return;
    };
    let target = &upstream.targets[index];
    let path: http::uri::PathAndQuery = match config.path.parse() {
        Ok(path) => path,
        Err(_) => return,
    };
    let host = HeaderValue::from_str(target.authority.as_str()).ok();
    let (mut passes, mut failures) = (0u32, 0u32);
    let mut interval = tokio::time::interval(config.interval.0);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut request = Request::new(UpstreamBody::Empty);
        *request.uri_mut() = http::Uri::from(path.clone());
        if let Some(host) = &host {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        request.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("portcullis-health-check"),
        );
        let passed = match tokio::time::timeout(
            config.timeout.0,
            upstream.pool.send(&target.authority, request),
        )
        .await
        {
            Ok(Ok(response)) => {
                response.status().is_success() || response.status().is_redirection()
            }
            _ => false,
        };
        let state = &target.state;
        if passed {
            failures = 0;
            passes = passes.saturating_add(1);
            if !state.is_healthy() && passes >= config.healthy_threshold {
                state.set_healthy(true);
                tracing::info!(
                    upstream = &*upstream.name,
                    upstream_target = &*target.label,
                    "target is healthy again"
                );
            }
        } else {
            passes = 0;
            failures = failures.saturating_add(1);
            if state.is_healthy() && failures >= config.unhealthy_threshold {
                state.set_healthy(false);
                tracing::warn!(
                    upstream = &*upstream.name,
                    upstream_target = &*target.label,
                    failures,
                    "target failed health checks"
                );
            }
        }
    }
}
