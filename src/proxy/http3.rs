//! HTTP/3 (experimental): a QUIC endpoint beside a TLS listener, on the same address over UDP,
//! with the listener's certificates, limits and routes.
//!
//! Requests go through the same [`handler::handle`] as HTTP/1.1 and HTTP/2: the request body is
//! handed over as a [`ClientBody`] and streams to the upstream, the response body is written back
//! as DATA frames (then trailers). The endpoint's UDP driver runs on the first worker's runtime;
//! every worker accepts from it, and a connection lives on the worker that accepted it, like a TCP
//! connection. The TCP listener advertises the endpoint with `Alt-Svc` (see `server.rs`).

use std::{
    future::poll_fn,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::AtomicUsize, Arc},
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::{
    forwarding,
    handler::{self, ConnInfo},
    server::{admit, AcceptContext},
    snapshot::{ListenerSpec, Snapshot},
};
use crate::{
    config::model::Http3Config,
    pipeline::{error_response, BoxError, ClientBody, ResponseBody},
    policy::authn::ClientCertificate,
};

/// QUIC streams a client may open for HTTP/3's own use (control, QPACK encoder and decoder, and a
/// few to spare for extensions and grease); requests use bidirectional streams.
const MAX_UNI_STREAMS: u32 = 16;

/// Bounds of the wait for a finished connection's last bytes to be acknowledged before it is
/// closed (three round trips, within these).
const CLOSE_GRACE_MIN: Duration = Duration::from_millis(50);
const CLOSE_GRACE_MAX: Duration = Duration::from_secs(1);

/// HTTP/3's "no error" code, for closing a connection that is done.
const H3_NO_ERROR: quinn::VarInt = quinn::VarInt::from_u32(0x100);

/// Why a listener's HTTP/3 settings cannot be compiled (reported on `listeners[i].http3`).
#[derive(Debug, thiserror::Error)]
pub enum Http3Error {
    #[error("the listener's TLS settings cannot be used for QUIC: {0}")]
    Tls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("`limits.idle_timeout` is too long for QUIC")]
    IdleTimeout(#[from] quinn::VarIntBoundsExceeded),
}

/// A listener's HTTP/3, compiled with the snapshot.
#[derive(Clone, Debug)]
pub struct Http3Spec {
    /// TLS (ALPN `h3`, TLS 1.3, no 0-RTT) and transport limits for the QUIC endpoint; applied
    /// again on reload, so renewed certificates reach new QUIC connections too.
    pub server: quinn::ServerConfig,
    /// `ma` of the advertisement.
    pub max_age: Duration,
    /// `Alt-Svc: h3=":PORT"; ma=SECONDS` for the TCP listener's responses. Set once the port is
    /// known, after binding (the configured port may be 0), on the compiled snapshot; never set
    /// when `max_age` is zero.
    pub alt_svc: std::sync::OnceLock<HeaderValue>,
}

impl Http3Spec {
    pub fn new(
        config: &Http3Config,
        tls: &rustls::ServerConfig,
        idle_timeout: Duration,
    ) -> Result<Self, Http3Error> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
            crate::tls::http3_server_config(tls),
        )?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(config.max_streams.into())
            .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
            .max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle_timeout)?));
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server
            .transport_config(Arc::new(transport))
            // a connection keeps the address it was admitted from (per-address limits, the peer
            // address in forwarding headers and logs)
            .migration(false);
        Ok(Self {
            server,
            max_age: config.advertise_max_age.0,
            alt_svc: std::sync::OnceLock::new(),
        })
    }

    /// Sets the advertisement for the UDP `port` actually bound (once).
    pub fn advertise(&self, port: u16) {
        let seconds = self.max_age.as_secs();
        if seconds > 0 {
            if let Ok(value) = HeaderValue::try_from(format!("h3=\":{port}\"; ma={seconds}")) {
                let _ = self.alt_svc.set(value);
            }
        }
    }
}

/// Binds the UDP socket of a listener's QUIC endpoint (synchronously, so start and reload report a
/// failure like a TCP bind failure).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Starts a QUIC endpoint on `socket`; its UDP driver runs on `runtime` (a worker's).
pub fn start_endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    runtime: &tokio::runtime::Handle,
) -> io::Result<quinn::Endpoint> {
    let _entered = runtime.enter();
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Closes the connections still open on `endpoints` (at the shutdown deadline, once draining gave
/// up), so their clients learn it at once instead of at their idle timeout; waits a moment for
/// the close to be sent.
pub async fn close(endpoints: &[quinn::Endpoint]) {
    for endpoint in endpoints {
        endpoint.close(H3_NO_ERROR, b"shutting down");
    }
    let sent = async {
        for endpoint in endpoints {
            endpoint.wait_idle().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(100), sent).await;
}

/// Accepts QUIC connections until `stop` flips (listener removed, or shutdown). Every worker runs
/// one on the shared endpoint; a connection is served by the worker that accepted it.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    name: Arc<str>,
    listener_count: Arc<AtomicUsize>,
    cx: AcceptContext,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = stop.changed() => return,
        };
        // `None`: the endpoint was closed
        let Some(incoming) = incoming else { return };
        let peer = incoming.remote_address();
        let Some((spec, admission)) = admit(&cx, &name, peer, &listener_count) else {
            incoming.refuse();
            continue;
        };
        // the connection's driver is spawned here, on this worker
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                tracing::debug!(listener = &*name, %peer, %error, "QUIC connection refused");
                continue;
            }
        };
        let cx = cx.clone();
        tokio::spawn(async move {
            serve_connection(connecting, peer, spec, cx).await;
            drop(admission);
        });
    }
}

/// Serves one QUIC connection: the handshake, then its requests, each on its own task, until the
/// client closes it, it idles out, or the gateway drains (GOAWAY, in-flight requests finish, then
/// the connection is closed).
async fn serve_connection(
    connecting: quinn::Connecting,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    cx: AcceptContext,
) {
    let connection = match tokio::time::timeout(spec.header_timeout, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "QUIC handshake timed out");
            return;
        }
    };
    // a client certificate the handshake verified, parsed once for the connection
    let client_certificate = connection
        .peer_identity()
        .and_then(|identity| {
            identity
                .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().and_then(ClientCertificate::from_der))
        .map(Arc::new);
    let info = Arc::new(ConnInfo {
        client_certificate,
        peer,
        peer_address: forwarding::PeerAddress::new(peer.ip()),
        listener: spec.name.clone(),
        tls: true,
        tls_version: Some("TLSv1.3"),
        activity: Default::default(),
        flags: Default::default(),
    });
    let h3 = h3::server::builder()
        .max_field_section_size(spec.max_header_bytes as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(connection.clone()))
        .await;
    let mut h3 = match h3 {
        Ok(h3) => h3,
        Err(error) => {
            tracing::debug!(%peer, %error, "HTTP/3 connection setup failed");
            return;
        }
    };
    let mut requests = tokio::task::JoinSet::new();
    let mut draining = cx.draining.clone();
    let mut drain = *draining.borrow();
    while !drain {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    requests.spawn(serve_request(resolver, info.clone(), spec.clone(), cx.snapshot.clone()));
                }
                // the client said GOAWAY and its requests are done
                Ok(None) => break,
                Err(error) => {
                    // closed by the client, idle timeout, or a protocol error
                    tracing::debug!(%peer, %error, "HTTP/3 connection ended");
                    break;
                }
            },
            // finished requests leave the set as they end
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            _ = draining.changed() => drain = true,
        }
    }
    if drain {
        // no further requests; those in flight finish
        if let Err(error) = h3.shutdown(0).await {
            tracing::debug!(%peer, %error, "cannot send HTTP/3 GOAWAY");
        }
    }
    while requests.join_next().await.is_some() {}
    // a response's last bytes may still be unacknowledged, and closing discards them: the client
    // (told GOAWAY, or done) gets a few round trips to close the connection itself
    let grace = (connection.rtt() * 3).clamp(CLOSE_GRACE_MIN, CLOSE_GRACE_MAX);
    let _ = tokio::time::timeout(grace, connection.closed()).await;
    connection.close(H3_NO_ERROR, b"");
    // the close is sent by the connection's driver on this worker: let it run before this task
    // releases the connection's place (after which a draining worker may stop)
    tokio::task::yield_now().await;
}

type Resolver = h3::server::RequestResolver<h3_quinn::Connection, Bytes>;
type SendStream = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvStream = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// One request: its head (within the listener's header timeout), the shared handler, the response
/// written back.
async fn serve_request(
    resolver: Resolver,
    info: Arc<ConnInfo>,
    spec: Arc<ListenerSpec>,
    snapshot: Arc<ArcSwap<Snapshot>>,
) {
    let resolved = tokio::time::timeout(spec.header_timeout, resolver.resolve_request()).await;
    let (request, stream) = match resolved {
        Ok(Ok(resolved)) => resolved,
        Ok(Err(error)) => {
            tracing::debug!(peer = %info.peer, %error, "invalid HTTP/3 request");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %info.peer, "HTTP/3 request head timed out");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let response = if request.headers().len() > spec.max_headers {
        // what hyper answers on the TCP listener (the head size is limited by QPACK's
        // `max_field_section_size`)
        error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            "too many header fields",
            &forwarding::new_request_id(),
        )
    } else {
        let body = RequestBody::open(recv, &request, spec.header_timeout).await;
        let request = request.map(|()| ClientBody::boxed(body));
        handler::handle(request, &info, snapshot.load_full()).await
    };
    if let Err(error) = respond(&mut send, response).await {
        tracing::debug!(peer = %info.peer, %error, "HTTP/3 response not completed");
    }
}

/// Headers that mean something only on an HTTP/1.1 connection; HTTP/3 forbids them.
const CONNECTION_SPECIFIC: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
];

/// Writes the response: HEADERS, the body as DATA frames, trailers if any, then the end of the
/// stream. The body's record (access log, metrics) completes when the body ends or, if the client
/// went away, when it is dropped here.
async fn respond(send: &mut SendStream, response: Response<ResponseBody>) -> Result<(), BoxError> {
    let (mut parts, body) = response.into_parts();
    for name in &CONNECTION_SPECIFIC {
        if parts.headers.contains_key(name) {
            parts.headers.remove(name);
        }
    }
    send.send_response(Response::from_parts(parts, ())).await?;
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                // the upstream failed mid-body: the client must not take it as complete
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Err(error);
            }
        };
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    send.send_data(data).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// A request body arriving on an HTTP/3 stream, for the shared request path.
///
/// HTTP/3 has no "no body" flag on the request head: the end of the stream may come right after
/// the head or much later. The request path needs to know: only a request without a body may be
/// retried on another target or served from the cache, and an upstream HTTP/1.1 request with a
/// body of unknown length goes chunked. So [`RequestBody::open`] looks ahead.
struct RequestBody {
    stream: RecvStream,
    /// What the look-ahead read, returned first.
    pending: Option<Result<Frame<Bytes>, BoxError>>,
    state: BodyState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl RequestBody {
    /// Wraps the request's receiving side. With `Content-Length: 0` there is nothing to read; a
    /// method that practically never carries a body (GET, HEAD, OPTIONS, DELETE) waits up to
    /// `wait` for the stream's end (normally in the same packet as the head); anything else takes
    /// what has already arrived without waiting, and streams from there.
    async fn open(stream: RecvStream, request: &Request<()>, wait: Duration) -> Self {
        let mut body = Self {
            stream,
            pending: None,
            state: BodyState::Data,
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared == Some(0) {
            body.state = BodyState::Done;
            return body;
        }
        let bodiless = declared.is_none()
            && matches!(
                *request.method(),
                Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
            );
        let first = if bodiless {
            tokio::time::timeout(wait, poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)))
                .await
                .ok()
        } else {
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(first) => Some(first),
                Poll::Pending => None,
            }
        };
        body.pending = first.flatten();
        body
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(pending) = this.pending.take() {
            return Poll::Ready(Some(pending));
        }
        loop {
            match this.state {
                BodyState::Data => match this.stream.poll_recv_data(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Some(mut data))) => {
                        let data = data.copy_to_bytes(data.remaining());
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Poll::Ready(Ok(None)) => this.state = BodyState::Trailers,
                    Poll::Ready(Err(error)) => {
                        this.state = BodyState::Done;
                        return Poll::Ready(Some(Err(error.into())));
                    }
                },
                BodyState::Trailers => {
                    let polled = match this.stream.poll_recv_trailers(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(polled) => polled,
                    };
                    this.state = BodyState::Done;
                    return Poll::Ready(match polled {
                        Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
                        Ok(None) => None,
                        Err(error) => Some(Err(error.into())),
                    });
                }
                BodyState::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
