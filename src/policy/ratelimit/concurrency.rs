//! Concurrency limits: open connections per client address (checked at accept), and requests in
//! flight per route or upstream (load shedding with 503), so a scaled-out backend stays within
//! its capacity. Counters live in the registry, so a reload does not reset them while requests
//! are in flight.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
};

const SHARDS: usize = 16;

/// Open connections per client address, across all listeners and workers.
#[derive(Debug)]
pub struct ConnectionCounts {
    shards: Box<[Mutex<HashMap<IpAddr, u32>>]>,
}

impl Default for ConnectionCounts {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    counts: Arc<ConnectionCounts>,
    ip: IpAddr,
}

impl ConnectionCounts {
    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let index = match ip {
            IpAddr::V4(v4) => v4.octets()[3] as usize,
            IpAddr::V6(v6) => v6.octets()[15] as usize,
        };
        self.shards[index % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection from `ip` unless it already has `max` open.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnectionSlot> {
        let mut shard = self.shard(&ip);
        let count = shard.entry(ip).or_insert(0);
        if *count as usize >= max {
            if *count == 0 {
                shard.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            counts: self.clone(),
            ip,
        })
    }

    /// Open connections from `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.shard(&ip).get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut shard = self.counts.shard(&self.ip);
        if let Some(count) = shard.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&self.ip);
            }
        }
    }
}

/// A cap on requests in flight (a route's or an upstream's).
#[derive(Debug, Clone)]
pub struct InFlightLimit {
    pub max: u32,
    count: Arc<AtomicU32>,
}

/// One request in flight; released when dropped (when its response has been sent).
#[derive(Debug)]
pub struct InFlightPermit(Arc<AtomicU32>);

impl InFlightLimit {
    pub fn new(max: u32, count: Arc<AtomicU32>) -> Self {
        Self { max, count }
    }

    pub fn try_acquire(&self) -> Option<InFlightPermit> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlightPermit(self.count.clone()))
    }
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The in-flight counters by name (`route:NAME`, `upstream:NAME`), kept across reloads.
#[derive(Debug, Default)]
pub struct InFlightCounters(Mutex<HashMap<String, Arc<AtomicU32>>>);

impl InFlightCounters {
    pub fn counter(&self, name: String) -> Arc<AtomicU32> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_permits_are_released_when_dropped() {
        let counts = Arc::new(ConnectionCounts::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = counts.acquire(ip, 2).unwrap();
        let _b = counts.acquire(ip, 2).unwrap();
        assert!(counts.acquire(ip, 2).is_none());
        drop(a);
        assert_eq!(counts.open(ip), 1);
        assert!(counts.acquire(ip, 2).is_some());

        let limit = InFlightLimit::new(1, Arc::default());
        let permit = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        drop(permit);
        assert!(limit.try_acquire().is_some());
    }
}
