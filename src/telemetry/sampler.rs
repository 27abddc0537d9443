//! The background work of the live statistics: a sample every interval, then the alert rules and
//! anomaly detection on it, and the notifications they raise.

use std::{sync::Arc, time::SystemTime};

use super::{
    alerts::{self, Notification, Notifier},
    anomaly, metrics, Observer,
};
use crate::config::model::AnomalyConfig;

/// Samples every interval; `current` reads the observer of the current config.
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
        // the cap is on new alerts: every resolved one goes out, so no receiver is left with
        // an incident that never closes
        if !raised || notifications.len() < MAX_ANOMALY_NOTIFICATIONS {
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
    // one series per rule, and one counting anomalous networks (a label per network would be
    // unbounded)
    let mut series: Vec<(String, i64)> = observer
        .alert_rules
        .iter()
        .map(|rule| {
            let on = firing.iter().any(|f| f.name == rule.name);
            (rule.name.clone(), i64::from(on))
        })
        .collect();
    let anomalous = firing
        .iter()
        .filter(|f| f.name.starts_with("anomaly:"))
        .count();
    series.push(("anomaly".into(), anomalous as i64));
    metrics.set_alert_series(&series);
    for notification in notifications {
        notifier.notify(notification, observer.webhooks.clone());
    }
}
