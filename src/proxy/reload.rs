//! Reload triggers and the process lifecycle: SIGHUP and a debounced watch of the config file
//! reload; SIGTERM/SIGINT drain and stop.
//!
//! The file watch polls the file's metadata twice a second and reloads once the content has
//! changed and then stayed the same for the debounce period. Polling (rather than inotify) also
//! follows the symlink swaps Kubernetes uses for mounted ConfigMaps.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use super::gateway::Gateway;
use crate::config;

/// How often the config file's metadata is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A change must stay put this long before it is loaded (editors write files in several steps).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Notices settled changes to a file's content.
#[derive(Debug)]
pub struct FileWatcher {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
    content_hash: u64,
    pending_since: Option<Instant>,
}

impl FileWatcher {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            seen: metadata(path),
            content_hash: std::fs::read(path).map(|c| hash(&c)).unwrap_or(0),
            pending_since: None,
        }
    }

    /// Returns true once when the content has changed and settled.
    pub fn poll(&mut self) -> bool {
        let now = metadata(&self.path);
        if now != self.seen {
            self.seen = now;
            self.pending_since = Some(Instant::now());
            return false;
        }
        match self.pending_since {
            Some(since) if since.elapsed() >= DEBOUNCE => {
                self.pending_since = None;
                let content = std::fs::read(&self.path).map(|c| hash(&c)).unwrap_or(0);
                let changed = content != self.content_hash;
                self.content_hash = content;
                changed
            }
            _ => false,
        }
    }
}

fn metadata(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Loads `path` and swaps it in; failures are logged and the running config stays.
pub fn reload_from_file(gateway: &mut Gateway, path: &Path, trigger: &str) {
    let loaded = match config::load_file(path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            gateway.count_reload(false);
            tracing::error!(trigger, errors = %errors, "config reload rejected; keeping the running config");
            return;
        }
    };
    match gateway.reload(&loaded) {
        Ok(summary) => tracing::info!(
            trigger,
            generation = summary.generation,
            added = ?summary.listeners_added,
            removed = ?summary.listeners_removed,
            "config reloaded"
        ),
        Err(error) => {
            tracing::error!(trigger, %error, "config reload rejected; keeping the running config")
        }
    }
}

/// The process signals the gateway answers. Install them before binding listeners: a SIGHUP
/// that arrives before its handler exists would kill the process (its default action).
pub struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP and on file changes, then drains.
pub async fn run_until_stopped(
    mut gateway: Gateway,
    path: Option<PathBuf>,
    signals: Signals,
) -> std::io::Result<()> {
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = signals;
    let mut watcher = path.as_deref().map(FileWatcher::new);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            _ = hangup.recv() => {
                if let Some(path) = &path {
                    reload_from_file(&mut gateway, path, "SIGHUP");
                }
            }
            _ = ticker.tick() => {
                let watching = gateway.snapshot().watch_config;
                if let (Some(watcher), Some(path), true) = (watcher.as_mut(), &path, watching) {
                    if watcher.poll() {
                        reload_from_file(&mut gateway, path, "file change");
                    }
                }
            }
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
        }
    };
    let deadline = gateway.snapshot().shutdown_timeout;
    tracing::info!(
        signal = reason,
        deadline_ms = deadline.as_millis() as u64,
        "draining connections"
    );
    let cut = gateway.shutdown().await;
    tracing::info!(connections_cut = cut, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_reports_a_settled_content_change_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let mut watcher = FileWatcher::new(&path);
        assert!(!watcher.poll());
        std::fs::write(&path, "a: 22\n").unwrap();
        assert!(!watcher.poll(), "not settled yet");
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        assert!(watcher.poll());
        assert!(!watcher.poll(), "reported once");
    }
}
