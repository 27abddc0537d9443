//! Accepting and serving client connections on a worker: TLS handshake, protocol choice (ALPN, or
//! the h2c preface on plaintext), hyper's HTTP/1.1 or HTTP/2 server with the listener's limits, and
//! graceful shutdown. The connection limits here also admit HTTP/3 connections (`super::http3`).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    conn::{ConnFlags, ConnIo},
    handler::{self, ConnInfo},
    snapshot::{ListenerSpec, Snapshot},
};
use crate::{
    pipeline::{ClientBody, ConnActivity},
    policy::authn::ClientCertificate,
};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// While draining, how often a connection that has not had its first request yet is checked.
const FIRST_REQUEST_POLL: Duration = Duration::from_millis(5);

/// Counts a worker's open connections so shutdown can wait for them to drain.
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    open: AtomicUsize,
    drained: tokio::sync::Notify,
}

impl ConnectionTracker {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until no connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Holds one open connection's place in the tracker and in the listener's connection count.
struct OpenConnection {
    tracker: Arc<ConnectionTracker>,
    listener_count: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
        self.listener_count.fetch_sub(1, Ordering::AcqRel);
        if self.tracker.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.drained.notify_waiters();
        }
    }
}

/// Everything an accept loop needs, shared by all of a worker's loops.
#[derive(Clone)]
pub struct AcceptContext {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub tracker: Arc<ConnectionTracker>,
    /// Flips to `true` when connections should finish their requests and close.
    pub draining: watch::Receiver<bool>,
}

/// A connection's places in the worker's tracker, the listener's connection count and the
/// per-address count, held for as long as the connection is open.
pub(super) struct Admission {
    _open: OpenConnection,
    _ip_slot: Option<crate::policy::ratelimit::ConnectionSlot>,
}

/// Admits a connection from `peer` on listener `name` unless a connection limit is reached;
/// returns the listener as the current snapshot has it. Shared by the TCP and QUIC accept loops
/// so both count against the same limits.
pub(super) fn admit(
    cx: &AcceptContext,
    name: &str,
    peer: SocketAddr,
    listener_count: &Arc<AtomicUsize>,
) -> Option<(Arc<ListenerSpec>, Admission)> {
    let snapshot = cx.snapshot.load_full();
    let spec = snapshot.listener(name).cloned()?;
    let ip_slot = match snapshot.max_connections_per_ip {
        None => None,
        Some(max) => match snapshot
            .connection_counts
            .acquire(peer.ip().to_canonical(), max)
        {
            Some(slot) => Some(slot),
            None => {
                tracing::debug!(listener = name, %peer, "connections per address limit reached; closing");
                return None;
            }
        },
    };
    if listener_count.fetch_add(1, Ordering::AcqRel) >= spec.max_connections {
        listener_count.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(listener = name, %peer, "connection limit reached; closing");
        return None;
    }
    cx.tracker.open.fetch_add(1, Ordering::AcqRel);
    let gauge = snapshot.observer.telemetry.metrics.open_connections.clone();
    gauge.inc();
    let open = OpenConnection {
        tracker: cx.tracker.clone(),
        listener_count: listener_count.clone(),
        gauge,
    };
    Some((
        spec,
        Admission {
            _open: open,
            _ip_slot: ip_slot,
        },
    ))
}

/// Accepts connections until `stop` flips (listener removed, or shutdown).
pub async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    listener_count: Arc<AtomicUsize>,
    cx: AcceptContext,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            // once told to stop, accept nothing more: a successor process may be accepting on
            // the same socket, and what stays in the queue is its
            biased;
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // out of file descriptors and the like: back off instead of spinning
                tracing::warn!(listener = &*name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some((spec, admission)) = admit(&cx, &name, peer, &listener_count) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let cx = cx.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, spec, cx).await;
            drop(admission);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    cx: AcceptContext,
) {
    let accepted = tokio::time::Instant::now();
    let activity = Arc::new(ConnActivity::default());
    let flags = Arc::new(ConnFlags::default());
    match &spec.tls {
        Some(tls_config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config.clone());
            let tls = match tokio::time::timeout(spec.header_timeout, acceptor.accept(stream)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let tls_version = match tls.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "TLSv1.3",
            };
            // a client certificate the handshake verified, parsed once for the connection
            let client_certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(ClientCertificate::from_der)
                .map(Arc::new);
            serve_io(
                tls,
                http2,
                Some(tls_version),
                client_certificate,
                accepted,
                peer,
                spec,
                cx,
                activity,
                flags,
            )
            .await;
        }
        None => {
            let http2 = spec.http2 && sniff_h2_preface(&stream, spec.header_timeout).await;
            serve_io(
                stream, http2, None, None, accepted, peer, spec, cx, activity, flags,
            )
            .await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_io<I>(
    io: I,
    http2: bool,
    tls_version: Option<&'static str>,
    client_certificate: Option<Arc<ClientCertificate>>,
    accepted: tokio::time::Instant,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    cx: AcceptContext,
    activity: Arc<ConnActivity>,
    flags: Arc<ConnFlags>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection_activity = activity.clone();
    let io = TokioIo::new(ConnIo::new(
        io,
        accepted,
        activity.clone(),
        flags.clone(),
        spec.header_timeout,
        spec.idle_timeout,
        !http2,
    ));
    let info = Arc::new(ConnInfo {
        client_certificate,
        peer,
        peer_address: super::forwarding::PeerAddress::new(peer.ip()),
        listener: spec.name.clone(),
        tls: tls_version.is_some(),
        tls_version,
        activity,
        flags,
    });
    let snapshot = cx.snapshot.clone();
    // clients learn from it that the listener also serves HTTP/3 (built once per bind)
    let alt_svc = spec.http3.as_ref().and_then(|h3| h3.alt_svc.get().cloned());
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let info = info.clone();
        let current = snapshot.load_full();
        let alt_svc = alt_svc.clone();
        async move {
            let request = request.map(ClientBody::Hyper);
            let mut response = handler::handle(request, &info, current).await;
            if let Some(alt_svc) = alt_svc {
                response
                    .headers_mut()
                    .insert(http::header::ALT_SVC, alt_svc);
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut draining = cx.draining.clone();
    let activity = &*connection_activity;
    if http2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(spec.max_header_bytes as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        drive(connection.as_mut(), &mut draining, None, |c| {
            c.graceful_shutdown()
        })
        .await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // the I/O wrapper enforces the head timeout (with a 408); hyper's own would cost a
            // timer per request and close silently
            .header_read_timeout(None)
            .max_buf_size(spec.max_header_bytes.max(8192))
            .max_header_size(spec.max_header_bytes)
            .keep_alive(true);
        if spec.max_headers != 100 {
            // hyper keeps up to 100 headers on the stack; other limits cost a heap allocation
            builder.max_headers(spec.max_headers);
        }
        // upgrades: a WebSocket tunnel takes the connection over after its 101 (see `upgrade`)
        let connection = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(connection);
        drive(connection.as_mut(), &mut draining, Some(activity), |c| {
            c.graceful_shutdown()
        })
        .await;
    }
}

/// Polls a connection to completion; when draining starts, asks it to finish gracefully
/// (HTTP/1.1: close after the current response, or at once if idle; HTTP/2: GOAWAY) and keeps
/// polling.
///
/// An HTTP/1.1 connection that has not had a request yet (`first_request`) is not idle in the
/// client's eyes: it was accepted moments ago (just before draining began, or while a successor
/// process took over the listening socket) and its first request may be on the wire. Closing it
/// would fail that request, so it first gets to deliver it (bounded by the head timeout and the
/// shutdown deadline), then finishes like the others. HTTP/2 needs no such wait: its `GOAWAY`
/// tells the client which streams were not taken, and hyper completes a handshake in progress
/// before sending it.
async fn drive<C, E>(
    mut connection: std::pin::Pin<&mut C>,
    draining: &mut watch::Receiver<bool>,
    first_request: Option<&ConnActivity>,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if !*draining.borrow() {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            _ = draining.changed() => {}
        }
    }
    while first_request.is_some_and(|activity| activity.started() == 0) {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error while draining");
                }
                return;
            }
            _ = tokio::time::sleep(FIRST_REQUEST_POLL) => {}
        }
    }
    shutdown(connection.as_mut());
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended with an error while draining");
    }
}

/// Reads ahead (without consuming) to see whether a plaintext client speaks HTTP/2 with prior
/// knowledge. Stops at the first byte that differs from the preface.
async fn sniff_h2_preface(stream: &TcpStream, timeout: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; 24];
        let mut last_seen = 0;
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if buf[..n] != H2_PREFACE[..n] {
                return false;
            }
            if n == H2_PREFACE.len() {
                return true;
            }
            if n == last_seen {
                // a prefix of the preface and nothing new yet: wait a little for the rest
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last_seen = n;
        }
    };
    tokio::time::timeout(timeout, sniff).await.unwrap_or(false)
}
