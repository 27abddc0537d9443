//! The running gateway: worker threads, bound listeners, the current snapshot, reload and shutdown.
//!
//! **Thread per core.** Each worker thread runs its own single-threaded tokio runtime and accepts on
//! every listener (the listening socket is shared, duplicated per worker); a connection lives and
//! dies on the worker that accepted it, with that worker's own upstream connection pools. The
//! control plane (admin API, health checks, reload, signals) runs on the caller's runtime.
//!
//! **HTTP/3.** A listener with `http3` also binds UDP on its address; the QUIC endpoint's socket is
//! driven by the first worker's runtime, every worker accepts QUIC connections from it, and a
//! connection lives on the worker that accepted it (see `http3.rs`).

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
    http3,
    server::{accept_loop, AcceptContext, ConnectionTracker},
    snapshot::{compile, ListenerSpec, Snapshot},
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
    /// HTTP/3: the UDP socket bound beside the TCP one (same address and port), until its QUIC
    /// endpoint is started on a worker.
    udp: Option<std::net::UdpSocket>,
    /// HTTP/3: the running QUIC endpoint.
    quic: Option<quinn::Endpoint>,
}

impl BoundListener {
    /// Starts the QUIC endpoint of a listener bound with HTTP/3, its UDP driver on `runtime`
    /// (part of binding: a failure fails the start or the reload).
    fn start_quic(
        &mut self,
        spec: &ListenerSpec,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<()> {
        if let (Some(udp), Some(http3)) = (self.udp.take(), &spec.http3) {
            self.quic = Some(http3::start_endpoint(udp, http3.server.clone(), runtime)?);
        }
        Ok(())
    }
}

enum WorkerCommand {
    Listen {
        name: Arc<str>,
        socket: std::net::TcpListener,
        connections: Arc<AtomicUsize>,
        stop: watch::Receiver<bool>,
    },
    /// Accept HTTP/3 connections from a listener's QUIC endpoint.
    ListenQuic {
        name: Arc<str>,
        endpoint: quinn::Endpoint,
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
    /// The worker's runtime (the first worker's drives the QUIC endpoints' sockets).
    runtime: tokio::runtime::Handle,
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
                        .and_then(|bound| bind_udp(bound, spec))
                        .map_err(http3_not_handed_over)
                }
                None => bind(spec),
            }
            .map_err(|source| StartError::Bind {
                name: spec.name.to_string(),
                addr: spec.bind,
                source,
            })?;
            listeners.insert(spec.name.clone(), bound);
        }
        advertise_http3(&snapshot, |name| {
            listeners.get(name).map(|l| l.local.port())
        });
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
        for spec in &snapshot.load().listeners {
            if let Some(listener) = listeners.get_mut(&spec.name) {
                listener
                    .start_quic(spec, &workers[0].runtime)
                    .map_err(|source| StartError::Bind {
                        name: spec.name.to_string(),
                        addr: spec.bind,
                        source,
                    })?;
            }
        }
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
            tracing::info!(listener = &**name, addr = %listener.local, http3 = listener.quic.is_some(), "listening");
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
            if let Some(endpoint) = &listener.quic {
                let _ = worker.commands.send(WorkerCommand::ListenQuic {
                    name: name.clone(),
                    endpoint: endpoint.clone(),
                    connections: listener.connections.clone(),
                    stop: listener.stop.subscribe(),
                });
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

    /// The UDP address a listener's HTTP/3 endpoint is bound to (the same as its TCP address).
    pub fn http3_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .get(listener)?
            .quic
            .as_ref()?
            .local_addr()
            .ok()
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
            // switching HTTP/3 on or off rebinds the listener (the TCP socket is kept, below)
            let unchanged = self.listeners.get(&spec.name).is_some_and(|l| {
                l.configured == spec.bind && l.quic.is_some() == spec.http3.is_some()
            });
            if !unchanged {
                let bound = bind(spec).or_else(|error| {
                    // a listener moving to a port this gateway already holds under another name
                    // (or the same listener with HTTP/3 switched): its sockets are shared
                    match self.listeners.values().find(|l| l.configured == spec.bind) {
                        Some(existing) if spec.bind.port() != 0 => {
                            let socket = existing.socket.try_clone()?;
                            let (udp, quic) = match (&spec.http3, &existing.quic) {
                                (None, _) => (None, None),
                                (Some(_), Some(endpoint)) => (None, Some(endpoint.clone())),
                                (Some(_), None) => (Some(http3::bind(existing.local)?), None),
                            };
                            Ok(BoundListener {
                                configured: spec.bind,
                                local: existing.local,
                                socket,
                                stop: watch::channel(false).0,
                                connections: Arc::new(AtomicUsize::new(0)),
                                udp,
                                quic,
                            })
                        }
                        _ => Err(error),
                    }
                });
                let bound = bound.and_then(|mut bound| {
                    bound.start_quic(spec, &self.workers[0].runtime)?;
                    Ok(bound)
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
        advertise_http3(&snapshot, |name| {
            fresh
                .iter()
                .find(|(fresh, _)| &**fresh == name)
                .map(|(_, l)| l)
                .or_else(|| self.listeners.get(name))
                .map(|l| l.local.port())
        });
        let snapshot = Arc::new(snapshot);
        self.state.snapshot.store(snapshot.clone());
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
                if let Some(endpoint) = &old.quic {
                    // no new QUIC connections (a listener taking the endpoint over sets its own
                    // config below); open ones finish
                    endpoint.set_server_config(None);
                }
                if !keep.contains(&name) {
                    summary.listeners_removed.push(name.to_string());
                }
                tracing::info!(listener = &*name, addr = %old.local, "listener stopped");
            }
        }
        for (name, bound) in fresh {
            self.announce(&name, &bound);
            tracing::info!(listener = &*name, addr = %bound.local, http3 = bound.quic.is_some(), "listening");
            summary.listeners_added.push(name.to_string());
            self.listeners.insert(name, bound);
        }
        // renewed certificates and changed limits reach new QUIC connections
        for (name, listener) in &self.listeners {
            if let (Some(endpoint), Some(http3)) = (
                &listener.quic,
                snapshot.listener(name).and_then(|s| s.http3.as_ref()),
            ) {
                endpoint.set_server_config(Some(http3.server.clone()));
            }
        }
        Ok(summary)
    }

    /// Stops accepting and closes this process's copies of the listening sockets (a successor's
    /// copies stay open); open connections carry on. Readiness turns false.
    pub fn stop_accepting(&mut self) {
        self.state.ready.store(false, Ordering::Release);
        for listener in self.listeners.values() {
            let _ = listener.stop.send(true);
            if let Some(endpoint) = &listener.quic {
                // refuse new QUIC handshakes; open connections drain with the others
                endpoint.set_server_config(None);
            }
        }
        self.listeners.clear();
    }

    /// Stops accepting, lets in-flight requests finish up to the configured deadline, then closes
    /// what is left. Returns the number of connections that had to be cut.
    pub async fn shutdown(mut self) -> usize {
        let endpoints: Vec<quinn::Endpoint> = self
            .listeners
            .values()
            .filter_map(|l| l.quic.clone())
            .collect();
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
        if cut > 0 && !endpoints.is_empty() {
            // the workers' runtimes still run (below): QUIC connections can still say goodbye
            http3::close(&endpoints).await;
        }
        // every worker has drained (or given up) before any stops: the first worker's runtime
        // drives the QUIC sockets the other workers' connections still use while they drain
        let threads: Vec<_> = std::mem::take(&mut self.workers)
            .into_iter()
            .filter_map(|mut worker| worker.thread.take())
            .collect();
        for thread in threads {
            let _ = thread.join();
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
    // built here so its handle is known before the thread runs (QUIC endpoints are started on it)
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let thread = thread::Builder::new()
        .name(format!("portcullis-worker-{index}"))
        .spawn(move || {
            set_worker_slot(index);
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
                        WorkerCommand::ListenQuic {
                            name,
                            endpoint,
                            connections,
                            stop,
                        } => {
                            tokio::spawn(http3::accept_loop(endpoint, name, connections, cx.clone(), stop));
                        }
                        WorkerCommand::Drain { deadline, done } => {
                            let drained = tokio::time::timeout(deadline, cx.tracker.drained()).await.is_ok();
                            let _ = done.send(if drained { 0 } else { cx.tracker.open() });
                            // runs on until the gateway lets go of the worker, once every worker
                            // is done draining
                        }
                    }
                }
            });
            // dropping the runtime closes whatever connections are still open
        })?;
    Ok(Worker {
        commands,
        thread: Some(thread),
        runtime: handle,
    })
}

/// Binds a listener's sockets: TCP, and UDP on the same address and port for HTTP/3.
fn bind(spec: &ListenerSpec) -> io::Result<BoundListener> {
    // with port 0 the UDP port follows the one TCP was given; should another socket hold that UDP
    // port, another pair is tried
    let attempts = if spec.http3.is_some() && spec.bind.port() == 0 {
        8
    } else {
        1
    };
    let mut attempt = 1;
    loop {
        let bound = adopt(spec.bind, bind_tcp(spec.bind)?)?;
        match bind_udp(bound, spec) {
            Ok(bound) => return Ok(bound),
            Err(_) if attempt < attempts => attempt += 1,
            Err(error) => return Err(error),
        }
    }
}

/// Adds the UDP socket of a listener with HTTP/3, on the address and port of its TCP socket.
fn bind_udp(mut bound: BoundListener, spec: &ListenerSpec) -> io::Result<BoundListener> {
    if spec.http3.is_some() {
        bound.udp = Some(http3::bind(bound.local)?);
    }
    Ok(bound)
}

/// Explains a UDP port held by the running gateway when its TCP socket was handed over: QUIC
/// sockets are not handed over (two processes reading one UDP socket would each drop the other's
/// packets), so the running gateway keeps the port until it exits.
fn http3_not_handed_over(error: io::Error) -> io::Error {
    if error.kind() != io::ErrorKind::AddrInUse {
        return error;
    }
    io::Error::new(
        error.kind(),
        format!(
            "{error}: the running gateway holds this listener's UDP port for HTTP/3, which a \
             hand-over does not pass on (see docs/http3.md); stop it and start this one instead, \
             or switch `http3` off for the upgrade and on again by reload"
        ),
    )
}

/// Sets the `Alt-Svc` advertisement of every HTTP/3 listener to the port it is bound to.
fn advertise_http3(snapshot: &Snapshot, port_of: impl Fn(&str) -> Option<u16>) {
    for spec in &snapshot.listeners {
        if let (Some(http3), Some(port)) = (&spec.http3, port_of(&spec.name)) {
            http3.advertise(port);
        }
    }
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
        udp: None,
        quic: None,
    })
}
