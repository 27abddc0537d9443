//! The running gateway: worker threads, bound listeners, the current snapshot, reload and shutdown.
//!
//! **Thread per core.** Each worker thread runs its own single-threaded tokio runtime and accepts on
//! every listener (the listening socket is shared, duplicated per worker); a connection lives and
//! dies on the worker that accepted it, with that worker's own upstream connection pools. The
//! control plane (admin API, health checks, reload, signals) runs on the caller's runtime.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    handoff::{HandedSocket, InheritedSockets, Role, SocketInfo},
    server::{accept_loop, AcceptContext, ConnectionTracker},
    snapshot::{compile, Snapshot},
};
use crate::{
    config::{ConfigErrors, LoadedConfig},
    policy::{
        authn::{KeyRefreshers, RevocationSync},
        ratelimit::{FastSyncTask, SharedScoresTask},
    },
    upstream::{health::HealthChecks, set_worker_slot, UpstreamRegistry},
};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config:\n{0}")]
    Config(ConfigErrors),
    #[error("cannot bind listener `{name}` on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot start worker thread: {0}")]
    Worker(io::Error),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::StartError),
}

/// Why a reload was refused; the previous config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("new config is invalid:\n{0}")]
    Config(ConfigErrors),
    #[error("cannot bind listener `{name}` on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// What a successful reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub generation: u64,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
}

/// State the admin API reads.
#[derive(Clone)]
pub struct GatewayState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// True once the config is loaded and every listener is bound; false again while draining.
    pub ready: Arc<AtomicBool>,
    /// True once `/readyz` found the start-up dependencies in place (remote key sets fetched,
    /// shared revocations read); after that a reload cannot take the gateway out of service.
    pub warmed_up: Arc<AtomicBool>,
    /// Revoked tokens and subjects (the admin API adds to them).
    pub revocations: Arc<crate::policy::authn::RevocationList>,
}

/// The background sync of a snapshot in Redis `fast` mode.
fn fast_sync(snapshot: &Snapshot) -> Option<Arc<crate::policy::ratelimit::FastSync>> {
    match &snapshot.rate_limit_shared {
        Some(crate::policy::ratelimit::SharedMode::Fast(sync)) => Some(sync.clone()),
        _ => None,
    }
}

struct BoundListener {
    /// The address as configured (port 0 allowed).
    configured: SocketAddr,
    /// The address actually bound.
    local: SocketAddr,
    socket: std::net::TcpListener,
    stop: watch::Sender<bool>,
    connections: Arc<AtomicUsize>,
}

enum WorkerCommand {
    Listen {
        name: Arc<str>,
        socket: std::net::TcpListener,
        connections: Arc<AtomicUsize>,
        stop: watch::Receiver<bool>,
    },
    Drain {
        deadline: Duration,
        done: oneshot::Sender<usize>,
    },
}

struct Worker {
    commands: mpsc::UnboundedSender<WorkerCommand>,
    thread: Option<thread::JoinHandle<()>>,
}

/// A running gateway. Dropping it without [`Gateway::shutdown`] stops the workers abruptly.
pub struct Gateway {
    state: GatewayState,
    registry: Arc<UpstreamRegistry>,
    workers: Vec<Worker>,
    listeners: HashMap<Arc<str>, BoundListener>,
    draining: watch::Sender<bool>,
    health: HealthChecks,
    key_refreshers: KeyRefreshers,
    revocation_sync: RevocationSync,
    rate_limit_sync: FastSyncTask,
    score_sync: SharedScoresTask,
    /// Live statistics, alert rules, anomaly detection.
    _sampler: crate::telemetry::Sampler,
    generation: u64,
    worker_count: usize,
}

impl Gateway {
    /// Compiles the config, binds every listener and starts the workers. Call inside a tokio
    /// runtime: health checks run on it. `workers` overrides the config's `server.workers`.
    pub fn start(loaded: &LoadedConfig, workers: Option<usize>) -> Result<Self, StartError> {
        Self::start_with_sockets(loaded, workers, &mut InheritedSockets::default())
    }

    /// [`Gateway::start`] on the sockets a previous gateway handed over where they fit (see
    /// [`InheritedSockets::take_listener`]); listeners without one are bound as usual. What the
    /// config does not take stays in `inherited`.
    pub fn start_with_sockets(
        loaded: &LoadedConfig,
        workers: Option<usize>,
        inherited: &mut InheritedSockets,
    ) -> Result<Self, StartError> {
        let worker_count = workers
            .or(loaded.config.server.workers)
            .unwrap_or_else(|| thread::available_parallelism().map_or(1, usize::from))
            .max(1);
        let observability = &loaded.config.observability;
        let telemetry = crate::telemetry::Telemetry::start(observability)?;
        let registry = Arc::new(UpstreamRegistry::with_telemetry(
            worker_count,
            Arc::new(telemetry),
        ));
        let snapshot = compile(loaded, &registry, 1).map_err(StartError::Config)?;
        for warning in &snapshot.warnings {
            tracing::warn!("{warning}");
        }
        let mut listeners = HashMap::new();
        for spec in &snapshot.listeners {
            let bound = match inherited.take_listener(&spec.name, spec.bind) {
                Some(handed) => {
                    tracing::debug!(listener = &*spec.name, from = %handed.info.name, "using the socket handed over");
                    adopt(spec.bind, handed.socket)
                }
                None => bind(spec.bind),
            }
            .map_err(|source| StartError::Bind {
                name: spec.name.to_string(),
                addr: spec.bind,
                source,
            })?;
            listeners.insert(spec.name.clone(), bound);
        }
        let health = HealthChecks::start(&snapshot.upstreams);
        let key_refreshers = KeyRefreshers::start(&snapshot.jwt_providers);
        let revocation_sync = RevocationSync::start(
            snapshot.shared_revocations.clone(),
            registry.revocations.clone(),
        );
        let rate_limit_sync = FastSyncTask::start(fast_sync(&snapshot));
        let score_sync = SharedScoresTask::start(snapshot.adaptive.clone());
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let sampler = {
            let snapshot = snapshot.clone();
            crate::telemetry::Sampler::start(move || snapshot.load().observer.clone())
        };
        let (draining, draining_rx) = watch::channel(false);
        let workers = (0..worker_count)
            .map(|index| spawn_worker(index, snapshot.clone(), draining_rx.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::Worker)?;
        let gateway = Self {
            state: GatewayState {
                snapshot,
                ready: Arc::new(AtomicBool::new(false)),
                warmed_up: Arc::new(AtomicBool::new(false)),
                revocations: registry.revocations.clone(),
            },
            registry,
            workers,
            listeners,
            draining,
            health,
            key_refreshers,
            revocation_sync,
            rate_limit_sync,
            score_sync,
            _sampler: sampler,
            generation: 1,
            worker_count,
        };
        for (name, listener) in &gateway.listeners {
            gateway.announce(name, listener);
            tracing::info!(listener = &**name, addr = %listener.local, "listening");
        }
        gateway.state.ready.store(true, Ordering::Release);
        Ok(gateway)
    }

    /// Tells every worker to accept on a listener.
    fn announce(&self, name: &Arc<str>, listener: &BoundListener) {
        for worker in &self.workers {
            match listener.socket.try_clone() {
                Ok(socket) => {
                    let _ = worker.commands.send(WorkerCommand::Listen {
                        name: name.clone(),
                        socket,
                        connections: listener.connections.clone(),
                        stop: listener.stop.subscribe(),
                    });
                }
                Err(error) => {
                    tracing::error!(listener = &**name, %error, "cannot share listener with a worker")
                }
            }
        }
    }

    pub fn state(&self) -> GatewayState {
        self.state.clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.snapshot.load_full()
    }

    pub fn worker_count(&self) -> usize {
        self.worker_count
    }

    /// Copies of every listening socket, described for a successor process
    /// ([`super::handoff`]).
    pub fn handoff_sockets(&self) -> io::Result<Vec<HandedSocket>> {
        self.listeners
            .iter()
            .map(|(name, listener)| {
                Ok(HandedSocket {
                    info: SocketInfo {
                        role: Role::Listener,
                        name: name.to_string(),
                        configured: listener.configured,
                        local: listener.local,
                    },
                    socket: listener.socket.try_clone()?,
                })
            })
            .collect()
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners.get(listener).map(|l| l.local)
    }

    /// Replaces the config. On any error the running config stays in place untouched.
    pub fn reload(&mut self, loaded: &LoadedConfig) -> Result<ReloadSummary, ReloadError> {
        let result = self.swap_in(loaded);
        self.count_reload(result.is_ok());
        result
    }

    /// Counts a reload's outcome (`portcullis_config_reloads_total`), also one refused before it
    /// reached [`Gateway::reload`] (a file that does not parse).
    pub fn count_reload(&self, ok: bool) {
        self.registry
            .telemetry
            .metrics
            .reloads
            .get_or_create(&crate::telemetry::metrics::KindLabel {
                kind: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    fn swap_in(&mut self, loaded: &LoadedConfig) -> Result<ReloadSummary, ReloadError> {
        let generation = self.generation + 1;
        let snapshot = compile(loaded, &self.registry, generation).map_err(ReloadError::Config)?;
        for warning in &snapshot.warnings {
            tracing::warn!("{warning}");
        }
        if snapshot.workers.is_some_and(|w| w != self.worker_count) {
            tracing::warn!("`server.workers` changed; it takes effect at the next restart");
        }
        // bind what is new before touching anything, so a failed bind changes nothing
        let mut fresh = Vec::new();
        for spec in &snapshot.listeners {
            let unchanged = self
                .listeners
                .get(&spec.name)
                .is_some_and(|l| l.configured == spec.bind);
            if !unchanged {
                let bound = bind(spec.bind).or_else(|error| {
                    // a listener moving to a port this gateway already holds under another name
                    match self.listeners.values().find(|l| l.configured == spec.bind) {
                        Some(existing) if spec.bind.port() != 0 => {
                            existing.socket.try_clone().map(|socket| BoundListener {
                                configured: spec.bind,
                                local: existing.local,
                                socket,
                                stop: watch::channel(false).0,
                                connections: Arc::new(AtomicUsize::new(0)),
                            })
                        }
                        _ => Err(error),
                    }
                });
                match bound {
                    Ok(bound) => fresh.push((spec.name.clone(), bound)),
                    Err(source) => {
                        return Err(ReloadError::Bind {
                            name: spec.name.to_string(),
                            addr: spec.bind,
                            source,
                        })
                    }
                }
            }
        }
        let mut summary = ReloadSummary {
            generation,
            ..ReloadSummary::default()
        };
        let health = HealthChecks::start(&snapshot.upstreams);
        let key_refreshers = KeyRefreshers::start(&snapshot.jwt_providers);
        let revocation_sync = RevocationSync::start(
            snapshot.shared_revocations.clone(),
            self.registry.revocations.clone(),
        );
        let rate_limit_sync = FastSyncTask::start(fast_sync(&snapshot));
        let score_sync = SharedScoresTask::start(snapshot.adaptive.clone());
        let keep: Vec<Arc<str>> = snapshot.listeners.iter().map(|l| l.name.clone()).collect();
        self.state.snapshot.store(Arc::new(snapshot));
        self.generation = generation;
        self.health = health;
        self.key_refreshers = key_refreshers;
        self.revocation_sync = revocation_sync;
        self.rate_limit_sync = rate_limit_sync;
        self.score_sync = score_sync;
        // stop listeners that are gone or moved
        let fresh_names: Vec<Arc<str>> = fresh.iter().map(|(n, _)| n.clone()).collect();
        let stale: Vec<Arc<str>> = self
            .listeners
            .keys()
            .filter(|name| !keep.contains(name) || fresh_names.contains(name))
            .cloned()
            .collect();
        for name in stale {
            if let Some(old) = self.listeners.remove(&name) {
                let _ = old.stop.send(true);
                if !keep.contains(&name) {
                    summary.listeners_removed.push(name.to_string());
                }
                tracing::info!(listener = &*name, addr = %old.local, "listener stopped");
            }
        }
        for (name, bound) in fresh {
            self.announce(&name, &bound);
            tracing::info!(listener = &*name, addr = %bound.local, "listening");
            summary.listeners_added.push(name.to_string());
            self.listeners.insert(name, bound);
        }
        Ok(summary)
    }

    /// Stops accepting and closes this process's copies of the listening sockets (a successor's
    /// copies stay open); open connections carry on. Readiness turns false.
    pub fn stop_accepting(&mut self) {
        self.state.ready.store(false, Ordering::Release);
        for listener in self.listeners.values() {
            let _ = listener.stop.send(true);
        }
        self.listeners.clear();
    }

    /// Stops accepting, lets in-flight requests finish up to the configured deadline, then closes
    /// what is left. Returns the number of connections that had to be cut.
    pub async fn shutdown(mut self) -> usize {
        self.stop_accepting();
        let deadline = self.state.snapshot.load().shutdown_timeout;
        let _ = self.draining.send(true);
        let mut waiting = Vec::new();
        for worker in &self.workers {
            let (done, finished) = oneshot::channel();
            if worker
                .commands
                .send(WorkerCommand::Drain { deadline, done })
                .is_ok()
            {
                waiting.push(finished);
            }
        }
        let mut cut = 0;
        for finished in waiting {
            cut += finished.await.unwrap_or(0);
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
        // the last requests' access-log lines reach the output before the process exits
        self.registry
            .telemetry
            .access_log
            .flush(Duration::from_secs(2))
            .await;
        cut
    }
}

fn spawn_worker(
    index: usize,
    snapshot: Arc<ArcSwap<Snapshot>>,
    draining: watch::Receiver<bool>,
) -> io::Result<Worker> {
    let (commands, mut inbox) = mpsc::unbounded_channel();
    let thread = thread::Builder::new()
        .name(format!("portcullis-worker-{index}"))
        .spawn(move || {
            set_worker_slot(index);
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "cannot build worker runtime");
                    return;
                }
            };
            let cx = AcceptContext {
                snapshot,
                tracker: Arc::new(ConnectionTracker::default()),
                draining,
            };
            runtime.block_on(async move {
                while let Some(command) = inbox.recv().await {
                    match command {
                        WorkerCommand::Listen {
                            name,
                            socket,
                            connections,
                            stop,
                        } => match tokio::net::TcpListener::from_std(socket) {
                            Ok(listener) => {
                                tokio::spawn(accept_loop(listener, name, connections, cx.clone(), stop));
                            }
                            Err(error) => tracing::error!(listener = &*name, %error, "worker cannot accept on listener"),
                        },
                        WorkerCommand::Drain { deadline, done } => {
                            let drained = tokio::time::timeout(deadline, cx.tracker.drained()).await.is_ok();
                            let _ = done.send(if drained { 0 } else { cx.tracker.open() });
                            break;
                        }
                    }
                }
            });
            // dropping the runtime closes whatever connections are still open
        })?;
    Ok(Worker {
        commands,
        thread: Some(thread),
    })
}

/// Binds a listening socket: non-blocking, `SO_REUSEADDR`, backlog 1024.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn bind(addr: SocketAddr) -> io::Result<BoundListener> {
    adopt(addr, bind_tcp(addr)?)
}

/// A listener on a socket that is already bound and listening (bound here, or handed over).
fn adopt(configured: SocketAddr, socket: std::net::TcpListener) -> io::Result<BoundListener> {
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    Ok(BoundListener {
        configured,
        local,
        socket,
        stop: watch::channel(false).0,
        connections: Arc::new(AtomicUsize::new(0)),
    })
}
