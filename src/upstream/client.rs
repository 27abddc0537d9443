//! Connections to upstream targets: establishing them (TCP, TLS with ALPN, HTTP/1.1 or HTTP/2
//! handshake) and keeping them alive for reuse.
//!
//! Each worker thread has its own idle list per target (`slots`), so a connection is only ever
//! driven and reused by the runtime that opened it: no cross-thread wake-ups, and the pool lock
//! is never contended. An HTTP/1.1 connection goes back to its idle list when the response body
//! has been read to the end (see [`UpstreamResponseBody`]); an HTTP/2 connection is shared by
//! every request of its worker.
//!
//! A request that offers an upgrade (it carries `Upgrade`, which only the gateway's WebSocket
//! support sets: clients' hop-by-hop headers never get this far) needs HTTP/1.1: it uses an idle
//! HTTP/1.1 connection or a new one whose TLS handshake offers only `http/1.1`, and a connection
//! that switched protocols never goes back to the pool — it belongs to the tunnel.

use std::{
    cell::Cell,
    hash::{Hash, Hasher},
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    uri::{Authority, PathAndQuery},
    Request, Response, Uri,
};
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::pipeline::UpstreamBody;

/// How targets are spoken to, from the target URL's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetScheme {
    /// `http://`: HTTP/1.1 with keep-alive.
    Http1,
    /// `h2c://`: HTTP/2 over plaintext with prior knowledge.
    H2c,
    /// `https://`: TLS, HTTP/2 or HTTP/1.1 by ALPN.
    Https,
}

impl TargetScheme {
    pub fn from_config(scheme: &str) -> Self {
        match scheme {
            "h2c" => Self::H2c,
            "https" => Self::Https,
            _ => Self::Http1,
        }
    }

    pub fn uri_scheme(self) -> http::uri::Scheme {
        match self {
            Self::Https => http::uri::Scheme::HTTPS,
            Self::Http1 | Self::H2c => http::uri::Scheme::HTTP,
        }
    }
}

/// Everything that shapes a pool; equal settings share pools across reloads.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub scheme: TargetScheme,
    /// TLS for `https` targets (ALPN is set here: `h2`, `http/1.1`).
    pub tls: Arc<rustls::ClientConfig>,
    /// Identifies the TLS settings (files and names) for equality; the config itself is not comparable.
    pub tls_fingerprint: String,
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl PartialEq for ClientSettings {
    fn eq(&self, other: &Self) -> bool {
        self.scheme == other.scheme
            && self.tls_fingerprint == other.tls_fingerprint
            && self.server_name == other.server_name
            && self.connect_timeout == other.connect_timeout
            && self.max_idle == other.max_idle
            && self.idle_timeout == other.idle_timeout
    }
}

impl Eq for ClientSettings {}

impl Hash for ClientSettings {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.scheme.hash(state);
        self.tls_fingerprint.hash(state);
        self.server_name.hash(state);
        self.connect_timeout.hash(state);
        self.max_idle.hash(state);
        self.idle_timeout.hash(state);
    }
}

thread_local! {
    static WORKER_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Called once by each worker thread with its index, so it uses its own idle lists.
pub fn set_worker_slot(index: usize) {
    WORKER_SLOT.with(|slot| slot.set(Some(index)));
}

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed")]
    Connect(#[source] io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("request failed")]
    Request(#[source] hyper::Error),
    /// An upgrade was asked of an upstream that speaks only HTTP/2 (`h2c://`).
    #[error("an upgrade needs HTTP/1.1, and the upstream speaks only HTTP/2")]
    UpgradeNeedsHttp1,
}

impl UpstreamError {
    /// Nothing reached the target: safe to try another one.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::ConnectTimeout | Self::Tls(_) | Self::Handshake(_)
        )
    }
}

/// A failed send; `request` is handed back when it was never written to a connection.
pub struct SendFailure {
    pub error: UpstreamError,
    pub request: Option<Request<UpstreamBody>>,
}

enum Conn {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

#[derive(Default)]
struct TargetIdle {
    http1: Vec<(http1::SendRequest<UpstreamBody>, Instant)>,
    http2: Option<http2::SendRequest<UpstreamBody>>,
}

#[derive(Default)]
struct Slot {
    targets: Mutex<Vec<(Authority, TargetIdle)>>,
}

/// An upstream's connections, one idle list per worker thread (plus one for other threads).
pub struct ConnectionPool {
    settings: ClientSettings,
    tls: tokio_rustls::TlsConnector,
    /// For upgrade requests: offers only `http/1.1` by ALPN.
    tls_http1: tokio_rustls::TlsConnector,
    slots: Box<[Slot]>,
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("settings", &self.settings)
            .finish()
    }
}

impl ConnectionPool {
    pub fn new(settings: ClientSettings, slots: usize) -> Self {
        let mut tls = (*settings.tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls_http1 = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            settings,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            tls_http1,
            slots: (0..slots.max(1)).map(|_| Slot::default()).collect(),
        }
    }

    fn slot_index(&self) -> usize {
        let last = self.slots.len() - 1;
        WORKER_SLOT.with(Cell::get).map_or(last, |i| i.min(last))
    }

    /// Sends `request` to `authority`, reusing an idle connection of this worker when there is
    /// one. A connection that turns out to be closed before the request was written is skipped.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponseBody>, SendFailure> {
        let slot = self.slot_index();
        let upgrade = request.headers().contains_key(http::header::UPGRADE);
        if upgrade && self.settings.scheme == TargetScheme::H2c {
            return Err(SendFailure {
                error: UpstreamError::UpgradeNeedsHttp1,
                request: None,
            });
        }
        while let Some(conn) = self.checkout(slot, authority, upgrade) {
            match self.send_on(conn, slot, authority, request).await {
                Ok(response) => return Ok(response),
                Err(failure) => match failure.request {
                    // the pooled connection was gone: try the next one
                    Some(unsent) => request = unsent,
                    None => return Err(failure),
                },
            }
        }
        // boxed: connecting (TCP, TLS, handshake) is the rare path, and its large future would
        // otherwise be part of every request's future and copied around with it
        let conn = match Box::pin(self.connect(authority, upgrade)).await {
            Ok(conn) => conn,
            Err(error) => {
                return Err(SendFailure {
                    error,
                    request: Some(request),
                })
            }
        };
        if let Conn::H2(sender) = &conn {
            self.share_http2(slot, authority, sender.clone());
        }
        self.send_on(conn, slot, authority, request).await
    }

    async fn send_on(
        self: &Arc<Self>,
        conn: Conn,
        slot: usize,
        authority: &Authority,
        request: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponseBody>, SendFailure> {
        let failed =
            |mut error: hyper::client::conn::TrySendError<Request<UpstreamBody>>| SendFailure {
                request: error.take_message(),
                error: UpstreamError::Request(error.into_error()),
            };
        let mut request = request;
        match conn {
            Conn::H2(mut sender) => {
                // HTTP/2 needs :scheme and :authority, taken from an absolute URI
                *request.uri_mut() = absolute_uri(self.settings.scheme, authority, request.uri());
                let response = sender.try_send_request(request).await.map_err(failed)?;
                Ok(response.map(|body| UpstreamResponseBody {
                    body,
                    release: None,
                }))
            }
            Conn::H1(mut sender) => {
                if request.uri().authority().is_some() {
                    // HTTP/1.1 to an origin server: origin-form (path and query only)
                    *request.uri_mut() = origin_uri(request.uri());
                }
                let request_body = request.body().progress();
                if let Err(error) = sender.ready().await {
                    // closed while idle: the request was not written
                    return Err(SendFailure {
                        error: UpstreamError::Request(error),
                        request: Some(request),
                    });
                }
                let response = sender.try_send_request(request).await.map_err(failed)?;
                // after a 101 the connection is the tunnel's (`hyper::upgrade::on`), never reused
                let release =
                    (response.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| Release {
                        pool: self.clone(),
                        slot,
                        authority: authority.clone(),
                        sender,
                        request_body,
                    });
                Ok(response.map(|body| UpstreamResponseBody { body, release }))
            }
        }
    }

    /// An idle connection to `authority`; `http1_only` for upgrades.
    fn checkout(&self, slot: usize, authority: &Authority, http1_only: bool) -> Option<Conn> {
        let mut targets = self.slots[slot]
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (_, idle) = targets
            .iter_mut()
            .find(|(a, _)| a.as_str() == authority.as_str())?;
        if let Some(sender) = idle.http2.as_ref().filter(|_| !http1_only) {
            if !sender.is_closed() {
                return Some(Conn::H2(sender.clone()));
            }
            idle.http2 = None;
        }
        while let Some((sender, since)) = idle.http1.pop() {
            if !sender.is_closed() && since.elapsed() < self.settings.idle_timeout {
                return Some(Conn::H1(sender));
            }
        }
        None
    }

    fn share_http2(
        &self,
        slot: usize,
        authority: &Authority,
        sender: http2::SendRequest<UpstreamBody>,
    ) {
        let mut targets = self.slots[slot]
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        entry(&mut targets, authority).http2 = Some(sender);
    }

    fn put_back(
        &self,
        slot: usize,
        authority: Authority,
        sender: http1::SendRequest<UpstreamBody>,
    ) {
        if sender.is_closed() {
            return;
        }
        let mut targets = self.slots[slot]
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let idle = entry(&mut targets, &authority);
        let timeout = self.settings.idle_timeout;
        idle.http1
            .retain(|(s, since)| !s.is_closed() && since.elapsed() < timeout);
        if idle.http1.len() < self.settings.max_idle {
            idle.http1.push((sender, Instant::now()));
        }
    }

    /// A new connection; `http1_only` (for upgrades) offers only `http/1.1` to TLS targets.
    async fn connect(
        &self,
        authority: &Authority,
        http1_only: bool,
    ) -> Result<Conn, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(authority.as_str()))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
            .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match self.settings.scheme {
            TargetScheme::Http1 => handshake_http1(tcp).await,
            TargetScheme::H2c => handshake_http2(tcp).await,
            TargetScheme::Https => {
                let name = self
                    .settings
                    .server_name
                    .as_deref()
                    .unwrap_or(authority.host());
                let name = ServerName::try_from(
                    name.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                )
                .map_err(|e| UpstreamError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                let connector = if http1_only {
                    &self.tls_http1
                } else {
                    &self.tls
                };
                let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| UpstreamError::ConnectTimeout)?
                    .map_err(UpstreamError::Tls)?;
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    handshake_http2(tls).await
                } else {
                    handshake_http1(tls).await
                }
            }
        }
    }
}

fn absolute_uri(scheme: TargetScheme, authority: &Authority, uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.uri_scheme());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("scheme, authority and path form a valid URI")
}

fn origin_uri(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("a path is a valid URI")
}

fn entry<'a>(
    targets: &'a mut Vec<(Authority, TargetIdle)>,
    authority: &Authority,
) -> &'a mut TargetIdle {
    let position = match targets
        .iter()
        .position(|(a, _)| a.as_str() == authority.as_str())
    {
        Some(position) => position,
        None => {
            targets.push((authority.clone(), TargetIdle::default()));
            targets.len() - 1
        }
    };
    &mut targets[position].1
}

async fn handshake_http1<T>(io: T) -> Result<Conn, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        // with upgrades: after a 101 the connection is handed to `hyper::upgrade::on` instead of
        // being closed
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(Conn::H1(sender))
}

async fn handshake_http2<T>(io: T) -> Result<Conn, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Conn::H2(sender))
}

/// Returns an HTTP/1.1 connection to its idle list once its response has been read completely.
struct Release {
    pool: Arc<ConnectionPool>,
    slot: usize,
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
    /// The request body still being uploaded keeps the connection busy: it is reusable only once
    /// that body has been sent completely (an upstream may answer before reading it all).
    request_body: Option<Arc<crate::pipeline::BodyProgress>>,
}

/// An upstream response body. When it has been read to the end, its HTTP/1.1 connection goes back
/// to the pool; dropped earlier, the connection is closed (it may still carry unread bytes).
pub struct UpstreamResponseBody {
    body: Incoming,
    release: Option<Release>,
}

impl UpstreamResponseBody {
    fn release(&mut self) {
        if let Some(release) = self.release.take() {
            if release
                .request_body
                .as_ref()
                .is_none_or(|body| body.finished())
            {
                release
                    .pool
                    .put_back(release.slot, release.authority, release.sender);
            }
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.release = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamResponseBody {
    fn drop(&mut self) {
        // bodiless responses (HEAD, 204, 304) may never be polled
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
