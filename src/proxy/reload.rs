//! Reload triggers and the process lifecycle: SIGHUP and a debounced watch of the config file
//! reload; SIGTERM/SIGINT drain and stop; a successor on the upgrade socket (or one SIGUSR2
//! starts) takes the listening sockets over, and then this process drains and stops.
//!
//! The file watch polls the file's metadata twice a second and reloads once the content has
//! changed and then stayed the same for the debounce period. Polling (rather than inotify) also
//! follows the symlink swaps Kubernetes uses for mounted ConfigMaps.

use std::{
    ffi::OsString,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, oneshot};

use super::{
    gateway::Gateway,
    handoff::{Accepting, HandedSocket, HandoffError, Successor, UpgradeListener},
};
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
/// (or SIGUSR2) that arrives before its handler exists would kill the process (its default
/// action).
pub struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    user2: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            user2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// The running gateway's side of zero-downtime restarts (`server.upgrade_socket`).
pub struct Upgrades {
    pub listener: UpgradeListener,
    /// A copy of the admin listener, handed over with the gateway's own, and the task serving
    /// it, stopped once a successor accepts.
    pub admin: Option<(HandedSocket, tokio::task::AbortHandle)>,
    /// What SIGUSR2 starts (`None`: SIGUSR2 is logged and ignored).
    pub successor: Option<SuccessorCommand>,
}

/// The command that starts a successor: this program, `run` with the same config and
/// `--upgrade-from` this gateway's upgrade socket.
#[derive(Clone, Debug)]
pub struct SuccessorCommand {
    /// Resolved when the gateway started, so a binary replaced on disk since is the one started.
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl SuccessorCommand {
    /// Starts the successor with this process's standard output and error. A thread waits for
    /// it so that one which fails is reaped and its status logged; one that succeeds outlives
    /// this process.
    fn spawn(&self) {
        let child = std::process::Command::new(&self.program)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(mut child) => {
                let pid = child.id();
                tracing::info!(successor = pid, program = %self.program.display(), "SIGUSR2: started a successor");
                let waiter = std::thread::Builder::new()
                    .name("portcullis-successor".into())
                    .spawn(move || match child.wait() {
                        Ok(status) if status.success() => {
                            tracing::info!(successor = pid, "the successor exited")
                        }
                        Ok(status) => tracing::error!(successor = pid, %status, "the successor failed; this gateway keeps serving"),
                        Err(error) => tracing::warn!(successor = pid, %error, "cannot wait for the successor"),
                    });
                if let Err(error) = waiter {
                    tracing::warn!(%error, "cannot watch the successor");
                }
            }
            Err(error) => {
                tracing::error!(program = %self.program.display(), %error, "SIGUSR2: cannot start a successor")
            }
        }
    }
}

/// Why the serving loop ended.
enum Stop {
    Signal(&'static str),
    HandedOver(Accepting),
}

async fn next_successor(upgrades: Option<&Upgrades>) -> Result<Successor, HandoffError> {
    match upgrades {
        Some(upgrades) => upgrades.listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Copies of every listening socket, the gateway's and the admin listener.
fn sockets_to_offer(gateway: &Gateway, upgrades: &Upgrades) -> std::io::Result<Vec<HandedSocket>> {
    let mut sockets = gateway.handoff_sockets()?;
    if let Some((admin, _)) = &upgrades.admin {
        sockets.push(HandedSocket {
            info: admin.info.clone(),
            socket: admin.socket.try_clone()?,
        });
    }
    Ok(sockets)
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP and on file changes, then drains. With
/// `upgrades`, a successor may take the listening sockets over instead: once it accepts on them
/// this process stops accepting, tells it so, and drains.
pub async fn run_until_stopped(
    mut gateway: Gateway,
    path: Option<PathBuf>,
    signals: Signals,
    mut upgrades: Option<Upgrades>,
) -> std::io::Result<()> {
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
        mut user2,
    } = signals;
    let mut watcher = path.as_deref().map(FileWatcher::new);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // one hand-over at a time; its outcome comes back on this channel
    let (handed_tx, mut handed_rx) = mpsc::channel::<Result<Accepting, HandoffError>>(1);
    // set while a hand-over is in progress: stopping on a signal cancels it
    let mut handing_over: Option<oneshot::Sender<()>> = None;
    let stop = loop {
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
            _ = user2.recv() => match upgrades.as_ref().and_then(|u| u.successor.as_ref()) {
                Some(_) if handing_over.is_some() => tracing::warn!("SIGUSR2 ignored: an upgrade is in progress"),
                Some(successor) => successor.spawn(),
                None => tracing::warn!("SIGUSR2 ignored: no `server.upgrade_socket` to hand the listening sockets over on"),
            },
            incoming = next_successor(upgrades.as_ref()) => match incoming {
                Ok(successor) if handing_over.is_some() => {
                    tokio::spawn(successor.refuse("another upgrade is in progress"));
                }
                Ok(successor) => {
                    let offered = upgrades.as_ref().map(|u| sockets_to_offer(&gateway, u));
                    match offered {
                        Some(Ok(sockets)) => {
                            tracing::info!(successor = successor.pid(), sockets = sockets.len(), "upgrade requested: handing the listening sockets over");
                            let (cancel, cancelled) = oneshot::channel();
                            handing_over = Some(cancel);
                            let handed = handed_tx.clone();
                            tokio::spawn(async move {
                                // only an explicit cancel counts, not the sender going away
                                let cancelled = async move {
                                    if cancelled.await.is_err() {
                                        std::future::pending::<()>().await;
                                    }
                                };
                                let outcome = successor.hand_over(sockets, cancelled).await;
                                let _ = handed.send(outcome).await;
                            });
                        }
                        Some(Err(error)) => {
                            tracing::error!(%error, "cannot copy the listening sockets; upgrade refused");
                            tokio::spawn(async move { successor.refuse(&format!("cannot copy the listening sockets: {error}")).await });
                        }
                        None => {}
                    }
                }
                Err(error) => tracing::warn!(%error, "upgrade connection refused"),
            },
            Some(outcome) = handed_rx.recv() => {
                handing_over = None;
                match outcome {
                    Ok(accepting) => break Stop::HandedOver(accepting),
                    // a process that only checked whether a gateway listens here
                    Err(HandoffError::Closed("hello")) => tracing::debug!("upgrade socket probed"),
                    Err(error) => tracing::error!(%error, "upgrade failed; this gateway keeps serving"),
                }
            }
            _ = terminate.recv() => break Stop::Signal("SIGTERM"),
            _ = interrupt.recv() => break Stop::Signal("SIGINT"),
        }
    };
    let deadline = gateway.snapshot().shutdown_timeout;
    match stop {
        Stop::Signal(reason) => {
            if let Some(cancel) = handing_over.take() {
                // a stop wins over an upgrade: the successor is told, and gives up
                let _ = cancel.send(());
            }
            tracing::info!(
                signal = reason,
                deadline_ms = deadline.as_millis() as u64,
                "draining connections"
            )
        }
        Stop::HandedOver(accepting) => {
            // the successor accepts on the same sockets: stop taking connections from them,
            // then let it know, so that it can take over the upgrade socket too
            gateway.stop_accepting();
            if let Some(mut upgrades) = upgrades.take() {
                upgrades.listener.relinquish();
                if let Some((_, admin_task)) = &upgrades.admin {
                    admin_task.abort();
                }
            }
            let successor = accepting.pid();
            // this process is about to exit: under systemd the successor becomes the service
            super::systemd::main_pid(successor);
            if let Err(error) = accepting.confirm().await {
                tracing::warn!(successor, %error, "cannot confirm the hand-over to the successor");
            }
            tracing::info!(
                successor,
                deadline_ms = deadline.as_millis() as u64,
                "handed over to the successor; draining connections"
            );
        }
    }
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
