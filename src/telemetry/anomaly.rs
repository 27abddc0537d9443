//! Anomaly detection over the security signals (401, 403, 404, 429) per client network.
//!
//! The request path counts events per network into the current interval (only for those
//! statuses); the sampler moves each interval's counts into a per-network window and judges it
//! against the network's own baseline. An anomalous network raises an alert and is handed to the
//! adaptive rate limiter, which tightens its limits.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
};

use crate::config::model::AnomalyConfig;

const SHARDS: usize = 16;

/// A network never seen before is taken to have been quiet for this many windows: its baseline
/// starts at zero with this weight, so a new burst stands out and is not learnt at once.
const PRIOR_WINDOWS: usize = 10;

/// The weight of the baseline is capped (old history fades) at this many intervals.
const MAX_BASELINE_WEIGHT: u32 = 1_000;

/// While a network is anomalous its baseline does not learn for this many windows (an attack is
/// not learnt as normal); after that it learns again, so a level that lasts becomes the new
/// normal (and a busy network seen for the first time is not flagged forever).
const FROZEN_WINDOWS: usize = 10;

/// Per-network event counts and windows. Lives as long as the gateway.
#[derive(Debug)]
pub struct NetworkSignals {
    current: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    windows: Mutex<HashMap<IpAddr, NetworkWindow>>,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Debug, Default)]
struct NetworkWindow {
    /// Events per interval, the last `window` intervals.
    recent: VecDeque<u32>,
    /// Mean events per interval before the window (frozen while anomalous: an ongoing attack is
    /// never learnt as normal).
    baseline: f64,
    /// Intervals that went into the baseline (its weight, capped).
    baseline_intervals: u32,
    anomalous: bool,
    /// Intervals since the network was last reported (raised, or still anomalous).
    since_report: usize,
    /// Intervals the network has been anomalous for.
    anomalous_for: usize,
}

/// What changed about a network in a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It just turned anomalous.
    Raised,
    /// It has stayed anomalous for another window (its limits are tightened again).
    Persisting,
    /// It calmed down.
    Calmed,
}

/// A network whose state changed (or persists) after a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkFinding {
    pub network: IpAddr,
    pub prefix: u8,
    pub events: u64,
    /// Baseline events per window.
    pub baseline: f64,
    pub change: Change,
}

impl Default for NetworkSignals {
    fn default() -> Self {
        Self {
            current: (0..SHARDS).map(|_| Mutex::default()).collect(),
            windows: Mutex::default(),
            hasher: Default::default(),
        }
    }
}

impl NetworkSignals {
    /// Counts one security event from `ip` (grouped by the configured prefix).
    pub fn record(&self, ip: IpAddr, config: &AnomalyConfig) {
        use std::hash::BuildHasher;
        let network = crate::policy::ratelimit::network(ip, config.ipv4_prefix, config.ipv6_prefix);
        let shard = self.hasher.hash_one(network) as usize % SHARDS;
        let mut shard = self.current[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&network) {
            *count = count.saturating_add(1);
        } else if shard.len() < config.max_networks.div_ceil(SHARDS) {
            shard.insert(network, 1);
        }
    }

    /// Closes one interval; `window` is the window in intervals. Returns the networks that
    /// turned anomalous or calm, and those still anomalous after another window.
    pub fn sample(&self, config: &AnomalyConfig, window: usize) -> Vec<NetworkFinding> {
        let mut arrived: HashMap<IpAddr, u32> = HashMap::new();
        for shard in self.current.iter() {
            arrived.extend(std::mem::take(
                &mut *shard.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for network in arrived.keys() {
            windows.entry(*network).or_insert_with(|| NetworkWindow {
                baseline_intervals: (PRIOR_WINDOWS * window).min(MAX_BASELINE_WEIGHT as usize)
                    as u32,
                ..Default::default()
            });
        }
        let mut findings = Vec::new();
        windows.retain(|network, state| {
            let count = arrived.get(network).copied().unwrap_or(0);
            state.recent.push_back(count);
            // `while`: a reload may have shortened the window
            while state.recent.len() > window {
                let left = f64::from(state.recent.pop_front().unwrap_or(0));
                if !state.anomalous || state.anomalous_for >= FROZEN_WINDOWS * window {
                    state.baseline_intervals =
                        (state.baseline_intervals + 1).min(MAX_BASELINE_WEIGHT);
                    state.baseline += (left - state.baseline) / f64::from(state.baseline_intervals);
                }
            }
            let events: u64 = state.recent.iter().map(|c| u64::from(*c)).sum();
            let baseline = state.baseline * window as f64;
            let anomalous =
                events >= config.min_events && events as f64 > config.rise_over_baseline * baseline;
            state.since_report += 1;
            state.anomalous_for = if anomalous {
                state.anomalous_for + 1
            } else {
                0
            };
            let change = match (state.anomalous, anomalous) {
                (false, true) => Some(Change::Raised),
                (true, false) => Some(Change::Calmed),
                (true, true) if state.since_report >= window => Some(Change::Persisting),
                _ => None,
            };
            state.anomalous = anomalous;
            if let Some(change) = change {
                state.since_report = 0;
                findings.push(NetworkFinding {
                    network: *network,
                    prefix: if network.is_ipv4() {
                        config.ipv4_prefix
                    } else {
                        config.ipv6_prefix
                    },
                    events,
                    baseline,
                    change,
                });
            }
            // forgotten once quiet and expected to stay so (under one event per window)
            events > 0 || state.anomalous || baseline >= 1.0
        });
        if windows.len() > config.max_networks {
            // full: the quietest go first, anomalous networks last
            let mut ranked: Vec<(bool, f64, IpAddr)> = windows
                .iter()
                .map(|(network, state)| {
                    let events: u32 = state.recent.iter().sum();
                    let expected = state.baseline * window as f64;
                    (state.anomalous, f64::from(events) + expected, *network)
                })
                .collect();
            ranked.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
            let excess = windows.len() - config.max_networks;
            for (_, _, network) in ranked.into_iter().take(excess) {
                windows.remove(&network);
            }
        }
        findings
    }

    /// Forgets every network (anomaly detection was turned off); returns those that were
    /// anomalous, as calmed.
    pub fn clear(&self) -> Vec<IpAddr> {
        for shard in self.current.iter() {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let anomalous = windows
            .iter()
            .filter(|(_, state)| state.anomalous)
            .map(|(network, _)| *network)
            .collect();
        windows.clear();
        anomalous
    }

    /// Networks tracked now.
    pub fn tracked(&self) -> usize {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AnomalyConfig {
        AnomalyConfig {
            min_events: 20,
            rise_over_baseline: 5.0,
            ..AnomalyConfig::default()
        }
    }

    fn burst(signals: &NetworkSignals, net: &str, n: u32) {
        for i in 0..n {
            signals.record(format!("{net}.{}", i % 250).parse().unwrap(), &config());
        }
    }

    #[test]
    fn a_burst_from_one_network_is_found_and_calms_down() {
        let signals = NetworkSignals::default();
        let config = config();
        // background noise from one /24 for a while: its baseline
        for _ in 0..20 {
            burst(&signals, "198.51.100", 1);
            assert!(signals.sample(&config, 3).is_empty());
        }
        burst(&signals, "203.0.113", 30);
        let findings = signals.sample(&config, 3);
        assert_eq!(findings.len(), 1);
        assert_eq!(
            findings[0].network,
            "203.0.113.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(findings[0].change, Change::Raised);
        assert_eq!(findings[0].events, 30);
        // quiet intervals: the burst leaves the window, the network calms down
        let mut calmed = Vec::new();
        for _ in 0..3 {
            calmed.extend(signals.sample(&config, 3));
        }
        assert_eq!(calmed.len(), 1);
        assert_eq!(calmed[0].change, Change::Calmed);
    }

    #[test]
    fn a_steady_attack_is_never_learnt_as_normal() {
        let signals = NetworkSignals::default();
        let config = config();
        let mut changes = Vec::new();
        for _ in 0..30 {
            burst(&signals, "203.0.113", 10);
            changes.extend(signals.sample(&config, 3).into_iter().map(|f| f.change));
        }
        assert_eq!(changes[0], Change::Raised);
        assert!(!changes.contains(&Change::Calmed), "{changes:?}");
        // reported again every window while it lasts
        assert_eq!(
            changes.iter().filter(|c| **c == Change::Persisting).count(),
            9
        );
        // a level that lasts far longer becomes the new normal
        for _ in 0..400 {
            burst(&signals, "203.0.113", 10);
            changes.extend(signals.sample(&config, 3).into_iter().map(|f| f.change));
        }
        assert_eq!(changes.last(), Some(&Change::Calmed), "{changes:?}");
    }

    #[test]
    fn a_network_with_a_busy_history_needs_a_real_rise() {
        let signals = NetworkSignals::default();
        let config = AnomalyConfig {
            min_events: 5,
            ..config()
        };
        let mut raised = 0;
        for _ in 0..5 {
            burst(&signals, "192.0.2", 1);
            raised += signals.sample(&config, 3).len();
        }
        assert_eq!(raised, 0, "3 events per window is below min_events");
        for _ in 0..5 {
            burst(&signals, "192.0.2", 100);
        }
        assert_eq!(signals.sample(&config, 3)[0].change, Change::Raised);
    }

    #[test]
    fn the_tracker_stays_bounded_and_keeps_the_loud() {
        let signals = NetworkSignals::default();
        let config = AnomalyConfig {
            max_networks: 32,
            ..config()
        };
        burst(&signals, "203.0.113", 50);
        // a flood of one-off networks to push it out
        for i in 0..200u32 {
            signals.record(
                format!("10.{}.{}.1", i / 256, i % 256).parse().unwrap(),
                &config,
            );
        }
        let findings = signals.sample(&config, 3);
        assert!(signals.tracked() <= 32);
        assert!(findings
            .iter()
            .any(|f| f.network == "203.0.113.0".parse::<IpAddr>().unwrap()));
        assert_eq!(
            signals.clear(),
            vec!["203.0.113.0".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(signals.tracked(), 0);
    }
}
