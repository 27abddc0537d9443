//! Alerts: rules judged after every sample of the live statistics, firing and resolved
//! notifications to the log and to webhooks. Delivery runs in its own task with retries; a slow
//! or dead receiver never holds up evaluation, let alone a request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
use serde::Serialize;
use tokio::sync::mpsc;

use super::stats::{Counts, History, LiveStats};
use crate::{
    config::model::{AlertRuleConfig, AlertSignal, Severity, WebhookConfig},
    upstream::ServiceEndpoint,
};

/// A rule compiled against the sampling interval.
#[derive(Debug, Clone)]
pub struct AlertRule {
    pub name: String,
    pub signal: AlertSignal,
    pub route: Option<String>,
    pub above: Option<f64>,
    pub rise_over_baseline: Option<f64>,
    window: usize,
    baseline: usize,
    for_: Duration,
    min_requests: u64,
    pub severity: Severity,
}

impl AlertRule {
    pub fn compile(config: &AlertRuleConfig, stats: &LiveStats) -> Self {
        Self {
            name: config.name.clone(),
            signal: config.signal,
            route: config.route.clone(),
            above: config.above,
            rise_over_baseline: config.rise_over_baseline,
            window: stats.samples_in(config.window.0),
            baseline: stats.samples_in(config.baseline.0),
            for_: config.for_.map(|d| d.0).unwrap_or_default(),
            min_requests: config.min_requests,
            severity: config.severity,
        }
    }

    /// The signal's value over the window (None: not enough data to judge), and the baseline
    /// when the rule compares with one.
    fn measure(&self, history: &History, interval: Duration) -> (Option<f64>, Option<f64>) {
        let (counts, n) = history.window(self.window);
        let last = history.last();
        let value = self.value(
            &counts,
            n,
            last.map(|s| (s.in_flight, s.connections, s.log_queue_fill)),
            interval,
        );
        let baseline = self.rise_over_baseline.and_then(|_| {
            let (counts, n) = history.window_before(self.window, self.baseline);
            // judged once at least half the baseline period has been seen
            (n * 2 >= self.baseline)
                .then(|| self.value(&counts, n, None, interval))
                .flatten()
        });
        (value, baseline)
    }

    fn value(
        &self,
        counts: &Counts,
        samples: usize,
        gauges: Option<(i64, i64, f64)>,
        interval: Duration,
    ) -> Option<f64> {
        if samples == 0 {
            return None;
        }
        let secs = samples as f64 * interval.as_secs_f64();
        let enough = counts.requests >= self.min_requests;
        match self.signal {
            AlertSignal::RequestRate => Some(counts.requests as f64 / secs),
            AlertSignal::ErrorRatio => enough.then(|| counts.error_ratio()),
            AlertSignal::LatencyP99 => counts.latency_quantile(0.99).filter(|_| enough),
            AlertSignal::LatencyP50 => counts.latency_quantile(0.5).filter(|_| enough),
            AlertSignal::AuthFailureRate => Some(counts.auth_failures as f64 / secs),
            AlertSignal::DeniedRate => Some(counts.denied as f64 / secs),
            AlertSignal::RateLimitedRate => Some(counts.rate_limited as f64 / secs),
            AlertSignal::InFlight => gauges.map(|g| g.0 as f64),
            AlertSignal::Connections => gauges.map(|g| g.1 as f64),
            AlertSignal::LogQueueFill => gauges.map(|g| g.2),
        }
    }

    fn holds(&self, value: Option<f64>, baseline: Option<f64>) -> bool {
        let Some(value) = value else { return false };
        let above = self.above.is_none_or(|above| value > above);
        let rise = match self.rise_over_baseline {
            None => true,
            Some(factor) => baseline.is_some_and(|baseline| value > factor * baseline),
        };
        above && rise
    }

    fn threshold(&self, baseline: Option<f64>) -> f64 {
        match (self.rise_over_baseline, baseline) {
            (Some(factor), Some(baseline)) => (factor * baseline).max(self.above.unwrap_or(0.0)),
            _ => self.above.unwrap_or(0.0),
        }
    }
}

/// An alert as shown on the dashboard and the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveAlert {
    pub name: String,
    pub state: &'static str,
    pub since: String,
    pub value: f64,
    pub threshold: f64,
    pub summary: String,
    pub severity: Severity,
}

/// A notification as sent to webhooks.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub alert: String,
    /// `firing` or `resolved`.
    pub state: &'static str,
    pub severity: Severity,
    pub summary: String,
    pub value: f64,
    pub threshold: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// When it started firing (RFC 3339).
    pub started_at: String,
    /// When it resolved (RFC 3339), for `resolved`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

#[derive(Debug)]
struct RuleState {
    pending_since: Option<Instant>,
    firing: Option<ActiveAlert>,
}

/// Which alerts are pending and firing; lives as long as the gateway (a reload keeps them).
#[derive(Debug, Default)]
pub struct AlertBook {
    states: Mutex<HashMap<String, RuleState>>,
}

impl AlertBook {
    /// Judges every rule on the histories; returns the notifications due.
    pub fn evaluate(&self, rules: &[AlertRule], stats: &LiveStats) -> Vec<Notification> {
        let now = Instant::now();
        let measured: Vec<(Option<f64>, Option<f64>)> = stats.with_histories(|histories| {
            rules
                .iter()
                .map(|rule| {
                    let history = match &rule.route {
                        Some(route) => histories.routes.get(route),
                        None => Some(&histories.overall),
                    };
                    history.map_or((None, None), |h| rule.measure(h, stats.interval))
                })
                .collect()
        });
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        // rules removed by a reload resolve
        let mut notifications: Vec<Notification> = Vec::new();
        states.retain(|name, state| {
            let kept = name.starts_with("anomaly:") || rules.iter().any(|r| &r.name == name);
            if !kept {
                if let Some(firing) = state.firing.take() {
                    notifications.push(resolved(&firing, None, None));
                }
            }
            kept
        });
        for (rule, (value, baseline)) in rules.iter().zip(measured) {
            let state = states.entry(rule.name.clone()).or_insert(RuleState {
                pending_since: None,
                firing: None,
            });
            if value.is_none() {
                // not enough data to judge (an outage may have stopped the traffic): a firing
                // alert keeps firing; a pending one starts over (`for` means continuously)
                state.pending_since = None;
                continue;
            }
            if rule.holds(value, baseline) {
                let value = value.unwrap_or_default();
                let since = *state.pending_since.get_or_insert(now);
                let threshold = rule.threshold(baseline);
                match &mut state.firing {
                    Some(firing) => {
                        firing.value = value;
                        firing.threshold = threshold;
                        firing.summary = summary(rule, value, threshold);
                    }
                    None if now.duration_since(since) >= rule.for_ => {
                        let firing = ActiveAlert {
                            name: rule.name.clone(),
                            state: "firing",
                            since: rfc3339(SystemTime::now()),
                            value,
                            threshold,
                            summary: summary(rule, value, threshold),
                            severity: rule.severity,
                        };
                        notifications.push(Notification {
                            alert: rule.name.clone(),
                            state: "firing",
                            severity: rule.severity,
                            summary: firing.summary.clone(),
                            value,
                            threshold,
                            route: rule.route.clone(),
                            network: None,
                            started_at: firing.since.clone(),
                            ended_at: None,
                        });
                        state.firing = Some(firing);
                    }
                    None => {}
                }
            } else {
                state.pending_since = None;
                if let Some(firing) = state.firing.take() {
                    notifications.push(resolved(&firing, rule.route.clone(), value));
                }
            }
        }
        notifications
    }

    /// Sets an alert raised outside the rules (anomaly detection) firing or resolved.
    pub fn set_external(&self, notification: &Notification) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if notification.state == "firing" {
            states.insert(
                notification.alert.clone(),
                RuleState {
                    pending_since: None,
                    firing: Some(ActiveAlert {
                        name: notification.alert.clone(),
                        state: "firing",
                        since: notification.started_at.clone(),
                        value: notification.value,
                        threshold: notification.threshold,
                        summary: notification.summary.clone(),
                        severity: notification.severity,
                    }),
                },
            );
        } else {
            states.remove(&notification.alert);
        }
    }

    /// When an external alert started firing (for its resolved notification).
    pub fn started_at(&self, name: &str) -> Option<String> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states
            .get(name)
            .and_then(|s| s.firing.as_ref())
            .map(|f| f.since.clone())
    }

    /// Every firing alert.
    pub fn firing(&self) -> Vec<ActiveAlert> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut firing: Vec<ActiveAlert> =
            states.values().filter_map(|s| s.firing.clone()).collect();
        firing.sort_by(|a, b| a.name.cmp(&b.name));
        firing
    }
}

fn resolved(firing: &ActiveAlert, route: Option<String>, value: Option<f64>) -> Notification {
    Notification {
        alert: firing.name.clone(),
        state: "resolved",
        severity: firing.severity,
        summary: format!("resolved: {}", firing.summary),
        value: value.unwrap_or(firing.value),
        threshold: firing.threshold,
        route,
        network: None,
        started_at: firing.since.clone(),
        ended_at: Some(rfc3339(SystemTime::now())),
    }
}

fn summary(rule: &AlertRule, value: f64, threshold: f64) -> String {
    let scope = match &rule.route {
        Some(route) => format!("route {route}"),
        None => "all routes".to_owned(),
    };
    let (what, shown, limit) = match rule.signal {
        AlertSignal::RequestRate => (
            "request rate",
            format!("{value:.1}/s"),
            format!("{threshold:.1}/s"),
        ),
        AlertSignal::ErrorRatio => (
            "error ratio",
            format!("{:.1}%", value * 100.0),
            format!("{:.1}%", threshold * 100.0),
        ),
        AlertSignal::LatencyP99 | AlertSignal::LatencyP50 => (
            if rule.signal == AlertSignal::LatencyP99 {
                "p99 latency"
            } else {
                "p50 latency"
            },
            format!("{:.0} ms", value * 1000.0),
            format!("{:.0} ms", threshold * 1000.0),
        ),
        AlertSignal::InFlight => (
            "requests in flight",
            format!("{value:.0}"),
            format!("{threshold:.0}"),
        ),
        AlertSignal::Connections => (
            "open connections",
            format!("{value:.0}"),
            format!("{threshold:.0}"),
        ),
        AlertSignal::LogQueueFill => (
            "access-log buffer fill",
            format!("{:.0}%", value * 100.0),
            format!("{:.0}%", threshold * 100.0),
        ),
        AlertSignal::AuthFailureRate => (
            "failed authentications",
            format!("{value:.1}/s"),
            format!("{threshold:.1}/s"),
        ),
        AlertSignal::DeniedRate => (
            "authorization denials",
            format!("{value:.1}/s"),
            format!("{threshold:.1}/s"),
        ),
        AlertSignal::RateLimitedRate => (
            "rate-limited requests",
            format!("{value:.1}/s"),
            format!("{threshold:.1}/s"),
        ),
    };
    format!("{what} {shown} above {limit} on {scope}")
}

/// RFC 3339 in UTC.
pub fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Delivers notifications: logs each, posts it to every webhook with retries.
#[derive(Debug, Clone)]
pub struct Notifier {
    sender: mpsc::Sender<Delivery>,
}

/// One compiled webhook.
#[derive(Debug)]
pub struct Webhook {
    endpoint: ServiceEndpoint,
    /// Scheme and host only, for the log: chat webhook URLs carry their secret in the path.
    origin: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    retries: u32,
    /// This webhook's deliveries in flight (with their retries): a dead receiver fills its own
    /// slots, never another webhook's.
    slots: Arc<tokio::sync::Semaphore>,
}

impl Webhook {
    pub fn compile(config: &WebhookConfig) -> Result<Self, String> {
        let endpoint = ServiceEndpoint::from_url(&config.url, config.timeout.0)?;
        let mut headers = Vec::new();
        if let Some(token) = config.token.as_deref().filter(|t| !t.is_empty()) {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "the token is not a valid header value".to_owned())?;
            headers.push((header::AUTHORIZATION, value));
        }
        if config.retries > MAX_RETRIES {
            return Err(format!("retries: at most {MAX_RETRIES}"));
        }
        // host and port only: no user info, no path (chat webhooks keep their secret there)
        let origin = config
            .url
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| {
                let host = uri.host()?;
                Some(match uri.port_u16() {
                    Some(port) => format!("{}://{host}:{port}", uri.scheme_str()?),
                    None => format!("{}://{host}", uri.scheme_str()?),
                })
            })
            .unwrap_or_default();
        Ok(Self {
            endpoint,
            origin,
            headers,
            timeout: config.timeout.0,
            retries: config.retries,
            slots: Arc::new(tokio::sync::Semaphore::new(DELIVERIES_PER_WEBHOOK)),
        })
    }
}

type Delivery = (Notification, Arc<Vec<Arc<Webhook>>>);

/// Deliveries (with their retries) in flight to one webhook at most; more are dropped.
const DELIVERIES_PER_WEBHOOK: usize = 16;

/// Retries of one delivery at most (`webhooks[].retries`).
pub const MAX_RETRIES: u32 = 10;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Notifier {
    /// Starts the delivery task (on the current runtime).
    pub fn start() -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, mut receiver) = mpsc::channel::<Delivery>(1024);
        let task = tokio::spawn(async move {
            while let Some((notification, webhooks)) = receiver.recv().await {
                let body = Bytes::from(serde_json::to_vec(&notification).unwrap_or_default());
                for webhook in webhooks.iter() {
                    // never waits: a webhook whose slots are all taken by slow deliveries
                    // loses this notification (with a warning), the others still get it
                    let Ok(slot) = webhook.slots.clone().try_acquire_owned() else {
                        tracing::warn!(
                            target: "alert",
                            webhook = &*webhook.origin,
                            alert = &*notification.alert,
                            "webhook busy with earlier deliveries; notification not sent to it"
                        );
                        continue;
                    };
                    // each webhook on its own: one slow receiver does not delay the others
                    let (webhook, body, alert) =
                        (webhook.clone(), body.clone(), notification.alert.clone());
                    tokio::spawn(async move {
                        deliver(webhook, body, alert).await;
                        drop(slot);
                    });
                }
            }
        });
        (Self { sender }, task)
    }

    /// Logs the notification and queues it for the webhooks (dropped, with a warning, when
    /// 1,024 are already waiting).
    pub fn notify(&self, notification: Notification, webhooks: Arc<Vec<Arc<Webhook>>>) {
        match notification.state {
            "firing" => tracing::warn!(
                target: "alert",
                alert = &*notification.alert,
                severity = ?notification.severity,
                value = notification.value,
                threshold = notification.threshold,
                "{}",
                notification.summary
            ),
            _ => tracing::info!(
                target: "alert",
                alert = &*notification.alert,
                "{}",
                notification.summary
            ),
        }
        if self.sender.try_send((notification, webhooks)).is_err() {
            tracing::warn!(target: "alert", "alert notification queue full; notification not sent to webhooks");
        }
    }
}

async fn deliver(webhook: Arc<Webhook>, body: Bytes, alert: String) {
    let mut backoff = Duration::from_millis(500);
    for attempt in 0..=webhook.retries {
        let sent = tokio::time::timeout(
            webhook.timeout,
            webhook
                .endpoint
                .post("application/json", &webhook.headers, body.clone()),
        )
        .await;
        match sent {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => {
                tracing::warn!(target: "alert", webhook = &*webhook.origin, alert, attempt, error, "webhook delivery failed")
            }
            Err(_) => {
                tracing::warn!(target: "alert", webhook = &*webhook.origin, alert, attempt, "webhook delivery timed out")
            }
        }
        if attempt < webhook.retries {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::units::HumanDuration, telemetry::stats::Tallied};

    fn rule(signal: AlertSignal, above: Option<f64>, rise: Option<f64>) -> AlertRuleConfig {
        AlertRuleConfig {
            name: "r".into(),
            signal,
            route: Some("orders".into()),
            above,
            rise_over_baseline: rise,
            baseline: HumanDuration::from_secs(4),
            window: HumanDuration::from_secs(2),
            for_: Some(HumanDuration::from_secs(0)),
            min_requests: 5,
            severity: Severity::Critical,
        }
    }

    fn traffic(stats: &LiveStats, ok: u32, failed: u32) {
        let route = stats.route("orders");
        for i in 0..ok + failed {
            route.add(&Tallied {
                status: if i < ok { 200 } else { 503 },
                duration: Duration::from_millis(1),
                auth_failure: false,
                denied: false,
            });
        }
        stats.sample(0, 0, 0, 0.0);
    }

    #[test]
    fn error_ratio_fires_and_resolves() {
        let stats = LiveStats::new(Duration::from_secs(1), Duration::from_secs(60));
        let rules = vec![AlertRule::compile(
            &rule(AlertSignal::ErrorRatio, Some(0.05), None),
            &stats,
        )];
        let book = AlertBook::default();
        traffic(&stats, 2, 0);
        assert!(
            book.evaluate(&rules, &stats).is_empty(),
            "too few requests to judge"
        );
        traffic(&stats, 10, 5);
        let fired = book.evaluate(&rules, &stats);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].state, "firing");
        assert!(
            fired[0].summary.contains("error ratio"),
            "{}",
            fired[0].summary
        );
        assert_eq!(book.firing().len(), 1);
        traffic(&stats, 20, 0);
        traffic(&stats, 20, 0);
        let resolved = book.evaluate(&rules, &stats);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].state, "resolved");
        assert!(book.firing().is_empty());
    }

    #[test]
    fn a_rise_is_judged_against_the_baseline() {
        let stats = LiveStats::new(Duration::from_secs(1), Duration::from_secs(60));
        let rules = vec![AlertRule::compile(
            &rule(AlertSignal::RequestRate, Some(5.0), Some(3.0)),
            &stats,
        )];
        let book = AlertBook::default();
        for _ in 0..6 {
            traffic(&stats, 10, 0);
            assert!(book.evaluate(&rules, &stats).is_empty(), "steady traffic");
        }
        traffic(&stats, 100, 0);
        traffic(&stats, 100, 0);
        let fired = book.evaluate(&rules, &stats);
        assert_eq!(fired.len(), 1, "100/s against a 10/s baseline");
    }
}
