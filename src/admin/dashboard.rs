//! The built-in dashboard: one embedded page (no external assets) and the JSON it polls.
//!
//! The page itself holds no data and is served without the admin token; it reads the token from
//! its URL fragment (never sent to a server) or asks for it, and sends it with every poll of
//! `/dashboard/data`, which needs it like the rest of the admin API.

use serde::Serialize;

use crate::{
    proxy::GatewayState,
    telemetry::{
        alerts::ActiveAlert,
        stats::{ClientTraffic, Point, Totals},
    },
};

/// The page, embedded at build time.
pub const PAGE: &str = include_str!("dashboard.html");

/// The page's `Content-Security-Policy`: only its own inline script and style (by hash), data
/// only from this listener, no framing.
pub static CONTENT_SECURITY_POLICY: std::sync::LazyLock<http::HeaderValue> =
    std::sync::LazyLock::new(|| {
        let policy = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash("script"),
            inline_hash("style"),
        );
        http::HeaderValue::from_str(&policy).expect("hashes are base64")
    });

/// `'sha256-…'` of the content of the page's one `<tag>` element.
fn inline_hash(tag: &str) -> String {
    use base64::Engine as _;
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let content = PAGE
        .split_once(open.as_str())
        .and_then(|(_, rest)| rest.split_once(close.as_str()))
        .map_or("", |(content, _)| content);
    let digest = crate::policy::authn::sha256(content.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Points per chart (5 minutes at the default 2 s interval).
const CHART_POINTS: usize = 150;

#[derive(Serialize)]
struct Data {
    generated_at: String,
    uptime_secs: u64,
    interval_secs: f64,
    overall: Series,
    routes: Vec<RouteSeries>,
    top_clients: Vec<ClientTraffic>,
    suspicious: Vec<crate::policy::ratelimit::Report>,
    blocked: Vec<crate::policy::ratelimit::Report>,
    upstreams: Vec<UpstreamHealth>,
    alerts: Vec<ActiveAlert>,
}

#[derive(Serialize)]
struct Series {
    series: Vec<Point>,
    totals: Totals,
}

#[derive(Serialize)]
struct RouteSeries {
    name: String,
    series: Vec<Point>,
    totals: Totals,
}

#[derive(Serialize)]
struct UpstreamHealth {
    name: String,
    targets: Vec<TargetHealth>,
}

#[derive(Serialize)]
struct TargetHealth {
    target: String,
    healthy: bool,
    ejected: bool,
    in_flight: u32,
}

/// `GET /dashboard/data`.
pub fn data(state: &GatewayState) -> serde_json::Value {
    let snapshot = state.snapshot.load();
    let telemetry = &snapshot.observer.telemetry;
    let stats = &telemetry.stats;
    let (overall, mut routes) = stats.with_histories(|histories| {
        let overall_totals = histories.overall_totals();
        let overall = Series {
            series: stats.points(&histories.overall, CHART_POINTS),
            totals: Totals::from(&overall_totals),
        };
        let routes: Vec<RouteSeries> = histories
            .routes
            .iter()
            .map(|(name, history)| RouteSeries {
                name: name.clone(),
                series: stats.points(history, CHART_POINTS),
                totals: histories
                    .totals
                    .get(name)
                    .map(Totals::from)
                    .unwrap_or_default(),
            })
            .collect();
        (overall, routes)
    });
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    let suspicious = snapshot
        .adaptive
        .as_ref()
        .map(|adaptive| adaptive.suspicious(50))
        .unwrap_or_default();
    let (blocked, suspicious): (Vec<_>, Vec<_>) =
        suspicious.into_iter().partition(|r| r.blocked_for_secs > 0);
    let upstreams = snapshot
        .upstreams
        .iter()
        .map(|upstream| {
            let now = upstream.ejection_clock();
            UpstreamHealth {
                name: upstream.name.to_string(),
                targets: upstream
                    .targets
                    .iter()
                    .map(|target| TargetHealth {
                        target: target.label.to_string(),
                        healthy: target.state.is_healthy(),
                        ejected: target.state.is_ejected(now),
                        in_flight: target.in_flight(),
                    })
                    .collect(),
            }
        })
        .collect();
    let data = Data {
        generated_at: crate::telemetry::alerts::rfc3339(std::time::SystemTime::now()),
        uptime_secs: telemetry.started.elapsed().as_secs(),
        interval_secs: stats.interval.as_secs_f64(),
        overall,
        routes,
        top_clients: telemetry.clients.top(10),
        suspicious: suspicious.into_iter().take(20).collect(),
        blocked: blocked.into_iter().take(20).collect(),
        upstreams,
        alerts: telemetry.alerts.firing(),
    };
    serde_json::to_value(data).unwrap_or_default()
}

/// Sets the upstream gauges from the current snapshot (just before `/metrics` is encoded).
pub fn refresh_upstream_gauges(state: &GatewayState) {
    use crate::telemetry::metrics::{TargetLabels, UpstreamLabel};
    let snapshot = state.snapshot.load();
    let metrics = &snapshot.observer.telemetry.metrics;
    for upstream in &snapshot.upstreams {
        let now = upstream.ejection_clock();
        let mut in_flight = 0i64;
        for target in upstream.targets.iter() {
            let labels = TargetLabels {
                upstream: upstream.name.to_string(),
                target: target.label.to_string(),
            };
            metrics
                .target_healthy
                .get_or_create(&labels)
                .set(i64::from(target.state.is_healthy()));
            metrics
                .target_ejected
                .get_or_create(&labels)
                .set(i64::from(target.state.is_ejected(now)));
            in_flight += i64::from(target.in_flight());
        }
        metrics
            .upstream_in_flight
            .get_or_create(&UpstreamLabel {
                upstream: upstream.name.to_string(),
            })
            .set(in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_page_s_inline_code_by_hash() {
        let policy = CONTENT_SECURITY_POLICY.to_str().unwrap();
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(policy.matches("'sha256-").count(), 2, "{policy}");
        // one script and one style element, so the hashes cover all the page's code
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(
            !PAGE.contains(" style=\""),
            "inline style attributes would be blocked"
        );
    }
}
