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

/// Per-network event counts and windows. Lives as long as the gateway.
#[derive(Debug)]
pub struct NetworkSignals {
    current: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    windows: Mutex<HashMap<IpAddr, NetworkWindow>>,
}

#[derive(Debug, Default)]
struct NetworkWindow {
    /// Events per interval, the last `window` intervals.
    recent: VecDeque<u32>,
    /// Mean events per interval before the window.
    baseline: f64,
    /// Intervals that went into the baseline (its weight, capped).
    baseline_intervals: u32,
    anomalous: bool,
}

/// A network's state after a sample, when it changed or is anomalous.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkFinding {
    pub network: IpAddr,
    pub prefix: u8,
    pub events: u64,
    /// Baseline events per window.
    pub baseline: f64,
    /// True: it just turned anomalous; false: it just calmed down.
    pub anomalous: bool,
}

impl Default for NetworkSignals {
    fn default() -> Self {
        Self {
            current: (0..SHARDS).map(|_| Mutex::default()).collect(),
            windows: Mutex::default(),
        }
    }
}

impl NetworkSignals {
    /// Counts one security event from `ip` (grouped by the configured prefix).
    pub fn record(&self, ip: IpAddr, config: &AnomalyConfig) {
        let network = crate::policy::ratelimit::network(ip, config.ipv4_prefix, config.ipv6_prefix);
        let shard = match network {
            IpAddr::V4(v4) => v4.octets()[2] as usize,
            IpAddr::V6(v6) => v6.octets()[7] as usize,
        } % SHARDS;
        let mut shard = self.current[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&network) {
            *count = count.saturating_add(1);
        } else if shard.len() < config.max_networks.div_ceil(SHARDS) {
            shard.insert(network, 1);
        }
    }

    /// Closes one interval; `window` is the window in intervals. Returns networks that turned
    /// anomalous or calm.
    pub fn sample(&self, config: &AnomalyConfig, window: usize) -> Vec<NetworkFinding> {
        let mut arrived: HashMap<IpAddr, u32> = HashMap::new();
        for shard in self.current.iter() {
            arrived.extend(std::mem::take(
                &mut *shard.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut findings = Vec::new();
        for network in arrived.keys() {
            if windows.len() < config.max_networks {
                windows.entry(*network).or_default();
            }
            // when full, a new network waits until quiet ones have been forgotten
        }
        windows.retain(|network, state| {
            let count = arrived.get(network).copied().unwrap_or(0);
            state.recent.push_back(count);
            if state.recent.len() > window {
                let left = state.recent.pop_front().unwrap_or(0) as f64;
                // the mean of what left the window (weight capped: old history fades)
                state.baseline_intervals = (state.baseline_intervals + 1).min(1_000);
                state.baseline += (left - state.baseline) / state.baseline_intervals as f64;
            }
            let events: u64 = state.recent.iter().map(|c| u64::from(*c)).sum();
            let baseline = state.baseline * window as f64;
            let anomalous =
                events >= config.min_events && events as f64 > config.rise_over_baseline * baseline;
            if anomalous != state.anomalous {
                state.anomalous = anomalous;
                findings.push(NetworkFinding {
                    network: *network,
                    prefix: if network.is_ipv4() {
                        config.ipv4_prefix
                    } else {
                        config.ipv6_prefix
                    },
                    events,
                    baseline,
                    anomalous,
                });
            }
            // a network with nothing in its window and a negligible baseline is forgotten
            events > 0 || state.baseline >= 0.01 || state.anomalous
        });
        findings
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

    #[test]
    fn a_burst_from_one_network_is_found_and_calms_down() {
        let signals = NetworkSignals::default();
        let config = config();
        // background noise from one /24 for a while: its baseline
        for _ in 0..20 {
            signals.record("198.51.100.7".parse().unwrap(), &config);
            assert!(signals.sample(&config, 3).is_empty());
        }
        // a burst spread over addresses of another /24
        for i in 0..30 {
            signals.record(format!("203.0.113.{i}").parse().unwrap(), &config);
        }
        let findings = signals.sample(&config, 3);
        assert_eq!(findings.len(), 1);
        assert_eq!(
            findings[0].network,
            "203.0.113.0".parse::<IpAddr>().unwrap()
        );
        assert!(findings[0].anomalous);
        assert_eq!(findings[0].events, 30);
        // quiet intervals: the burst leaves the window, the network calms down
        let mut calmed = Vec::new();
        for _ in 0..3 {
            calmed.extend(signals.sample(&config, 3));
        }
        assert_eq!(calmed.len(), 1);
        assert!(!calmed[0].anomalous);
    }

    #[test]
    fn steady_traffic_does_not_fire_against_its_baseline() {
        let signals = NetworkSignals::default();
        let config = config();
        for _ in 0..40 {
            for _ in 0..10 {
                signals.record("192.0.2.1".parse().unwrap(), &config);
            }
            let findings = signals.sample(&config, 3);
            // 30 per window, above min_events: fires while the baseline is young, then calms
            if let Some(finding) = findings.first() {
                assert!(finding.anomalous || finding.baseline > 0.0);
            }
        }
        for _ in 0..10 {
            signals.record("192.0.2.1".parse().unwrap(), &config);
        }
        assert!(
            signals.sample(&config, 3).is_empty(),
            "steady rate is the baseline"
        );
    }
}
