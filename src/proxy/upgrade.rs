//! WebSocket upgrades (RFC 6455 over HTTP/1.1): a route that opts in lets an upgrade request
//! through, and once the upstream answers `101 Switching Protocols`, the two upgraded connections
//! are spliced byte for byte until either side closes or the tunnel stays idle too long.
//!
//! The upgrade request is an ordinary request until the 101: routing, authentication,
//! authorization and rate limits all run on it, and a refusal is an ordinary response (no tunnel).
//! On routes without `websocket: true` the upgrade headers are removed like any other hop-by-hop
//! header, so the upstream sees a plain `GET` and can never answer with a tunnel; a 101 it sends
//! anyway is refused (502). Only HTTP/1.1 clients can upgrade: HTTP/2's extended CONNECT
//! (RFC 8441) is not supported.
//!
//! The request's record ([`Completion`]) moves into the tunnel task, so the access-log line is
//! written once, when the tunnel ends: status 101, its duration the tunnel's, `bytes_out` what
//! the client was sent and `bytes_in` what it sent. The route's in-flight permits (and the
//! connection's in-flight marker) are held for as long as the tunnel lives, so `max_in_flight`
//! caps a route's open tunnels.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::snapshot::Route;
use crate::{
    config::{model::RouteConfig, ErrorSink},
    pipeline::{Completion, GatewayError, ResponseBody},
    upstream::TargetScheme,
};

/// Without `websocket_idle_timeout`: long enough for applications that ping every minute or so,
/// short enough that abandoned tunnels do not pile up.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

const UPGRADE_TOKEN: &str = "upgrade";
const WEBSOCKET: &str = "websocket";

/// A route's WebSocket settings; present only on routes with `websocket: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketSettings {
    /// A tunnel with no byte either way for this long is closed.
    pub idle_timeout: Duration,
}

impl WebSocketSettings {
    /// The settings of `route` (at `path` in the config), reporting what cannot work: an idle
    /// timeout without upgrades, a zero timeout, an upstream that only speaks HTTP/2.
    pub fn compile(
        route: &RouteConfig,
        scheme: TargetScheme,
        path: &str,
        sink: &mut ErrorSink<'_>,
    ) -> Option<Self> {
        if !route.websocket {
            if route.websocket_idle_timeout.is_some() {
                sink.error(
                    format!("{path}.websocket_idle_timeout"),
                    "only applies with `websocket: true`",
                );
            }
            return None;
        }
        let idle_timeout = route
            .websocket_idle_timeout
            .map_or(DEFAULT_IDLE_TIMEOUT, |t| t.0);
        if idle_timeout.is_zero() {
            sink.error(
                format!("{path}.websocket_idle_timeout"),
                "must be more than 0",
            );
        }
        if scheme == TargetScheme::H2c {
            // an HTTP/2 connection has no HTTP/1.1 upgrade, and extended CONNECT is not spoken
            sink.error(
                format!("{path}.websocket"),
                "the upstream's targets are `h2c://` (HTTP/2 only): WebSocket upgrades need HTTP/1.1 targets (`http://` or `https://`)",
            );
        }
        Some(Self { idle_timeout })
    }
}

/// Whether a request head asks for a WebSocket upgrade: `GET` over HTTP/1.1 with `upgrade` among
/// the `Connection` options and `websocket` among the `Upgrade` protocols (RFC 6455 §4.1).
pub fn is_websocket_request(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    method == Method::GET
        && version == Version::HTTP_11
        && has_token(headers, header::CONNECTION, UPGRADE_TOKEN)
        && has_token(headers, header::UPGRADE, WEBSOCKET)
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A client's WebSocket upgrade request, accepted by its route, until the upstream answers.
pub struct ClientUpgrade {
    on_upgrade: OnUpgrade,
    idle_timeout: Duration,
}

impl ClientUpgrade {
    /// Takes the client's side of the upgrade when `request` asks for a WebSocket and `route`
    /// allows it. Must run before the hop-by-hop headers are removed (they are what it reads).
    /// `None`: not an upgrade, or not allowed here — then the request goes on as a plain one.
    pub fn accept(route: &Route, request: &mut http::request::Parts) -> Option<Self> {
        let settings = route.websocket?;
        if !is_websocket_request(&request.method, request.version, &request.headers) {
            return None;
        }
        // hyper hands the connection over through this once the 101 has been written
        let on_upgrade = request.extensions.remove::<OnUpgrade>()?;
        Some(Self {
            on_upgrade,
            idle_timeout: settings.idle_timeout,
        })
    }

    /// Offers the upgrade to the upstream (after the client's hop-by-hop headers were removed).
    /// The `Sec-WebSocket-*` headers are end-to-end and pass as they came.
    pub fn offer(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static(UPGRADE_TOKEN));
        headers.insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
    }
}

/// Decides what the upstream's answer means, before its hop-by-hop headers are removed.
///
/// A 101 to an accepted upgrade that names `websocket` becomes a [`Tunnel`]; a 101 to anything
/// else is refused (the client would be told of a protocol switch with nothing behind it). Any
/// other status is an ordinary response, and the client's upgrade is dropped with `upgrade`.
pub fn answer(
    upgrade: Option<ClientUpgrade>,
    response: &mut http::response::Parts,
) -> Result<Option<Tunnel>, GatewayError> {
    if response.status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(None);
    }
    let Some(upgrade) = upgrade else {
        return Err(GatewayError::UpstreamProtocol);
    };
    if !has_token(&response.headers, header::UPGRADE, WEBSOCKET) {
        return Err(GatewayError::UpstreamProtocol);
    }
    let upstream = response
        .extensions
        .remove::<OnUpgrade>()
        .ok_or(GatewayError::UpstreamProtocol)?;
    Ok(Some(Tunnel {
        client: upgrade.on_upgrade,
        upstream,
        idle_timeout: upgrade.idle_timeout,
    }))
}

/// Both sides of an agreed upgrade, waiting for the 101 to reach the client.
#[derive(Clone)]
pub struct Tunnel {
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Duration,
}

impl Tunnel {
    /// The 101 for the client (the upstream's head, hop-by-hop headers already removed). The
    /// tunnel rides in its extensions until [`complete`] starts it.
    pub fn response(self, mut head: http::response::Parts) -> Response<ResponseBody> {
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static(UPGRADE_TOKEN));
        head.headers
            .insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
        head.version = Version::HTTP_11;
        head.extensions.insert(self);
        Response::from_parts(head, ResponseBody::empty())
    }

    async fn run(self, mut completion: Box<Completion>) {
        let ctx = &mut completion.ctx;
        let upgraded = tokio::try_join!(self.client, self.upstream);
        let (client, upstream) = match upgraded {
            Ok(pair) => pair,
            Err(error) => {
                let error = TunnelError::Upgrade(error);
                tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or_default(), %error, "websocket tunnel did not open");
                ctx.response_aborted = true;
                return;
            }
        };
        let from_client = Arc::new(AtomicU64::new(0));
        let to_client = Arc::new(AtomicU64::new(0));
        let mut client = Metered::new(TokioIo::new(client), from_client.clone());
        let mut upstream = Metered::new(TokioIo::new(upstream), to_client.clone());
        let ended = splice(&mut client, &mut upstream, self.idle_timeout, || {
            from_client.load(Ordering::Relaxed) + to_client.load(Ordering::Relaxed)
        })
        .await;
        ctx.bytes_out = to_client.load(Ordering::Relaxed);
        ctx.bytes_in = Some(from_client.load(Ordering::Relaxed));
        match ended {
            Ok(Ended::Closed) => {}
            Ok(Ended::IdleTimeout) => {
                tracing::debug!(
                    request_id = ctx.request_id.to_str().unwrap_or_default(),
                    "websocket tunnel closed after its idle timeout"
                );
            }
            Err(error) => {
                tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or_default(), %error, "websocket tunnel failed");
                ctx.response_aborted = true;
            }
        }
        // dropping `completion` writes the access-log line and releases the permits
    }
}

/// Attaches the request's record to the response: to its body as usual, or — for a 101 — to the
/// tunnel, which is started here and finishes the record when it closes.
pub fn complete(
    mut response: Response<ResponseBody>,
    completion: Box<Completion>,
) -> Response<ResponseBody> {
    match response.extensions_mut().remove::<Tunnel>() {
        Some(tunnel) => {
            let mut completion = completion;
            completion.ctx.upgraded_at = Some(std::time::Instant::now());
            tokio::spawn(tunnel.run(completion));
            response
        }
        None => response.map(|body| body.with_completion(completion)),
    }
}

/// Why a tunnel ended badly.
#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("the connection was not handed over for the upgrade")]
    Upgrade(#[source] hyper::Error),
    #[error("tunnel I/O failed")]
    Io(#[source] io::Error),
}

/// How a tunnel ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Both sides closed.
    Closed,
    IdleTimeout,
}

/// Copies both ways until both sides have closed (a side's end of stream is passed on as a
/// write shutdown), or until `moved` (bytes copied so far) has not changed for `idle`.
///
/// The idle check ticks at a quarter of the timeout rather than re-arming a timer on every read,
/// so a busy tunnel costs no timer work; a timeout fires between 1× and 1.25× `idle`.
async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
    moved: impl Fn() -> u64,
) -> Result<Ended, TunnelError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let tick = (idle / 4).max(Duration::from_millis(10));
    let quiet_ticks_allowed = idle.as_nanos().div_ceil(tick.as_nanos()).max(1);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let copy = tokio::io::copy_bidirectional(a, b);
    tokio::pin!(copy);
    let mut seen = moved();
    let mut quiet_ticks = 0u128;
    loop {
        tokio::select! {
            copied = copy.as_mut() => {
                return copied.map(|_| Ended::Closed).map_err(TunnelError::Io);
            }
            _ = ticks.tick() => {
                let now = moved();
                if now == seen {
                    quiet_ticks += 1;
                    if quiet_ticks >= quiet_ticks_allowed {
                        return Ok(Ended::IdleTimeout);
                    }
                } else {
                    seen = now;
                    quiet_ticks = 0;
                }
            }
        }
    }
}

/// Counts the bytes read from a stream (what that side sent through the tunnel).
struct Metered<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T> Metered<T> {
    fn new(inner: T, read: Arc<AtomicU64>) -> Self {
        Self { inner, read }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = (buf.filled().len() - before) as u64;
            this.read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::header_map as headers;

    #[test]
    fn an_upgrade_request_needs_get_http11_and_both_tokens() {
        let upgrade = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(is_websocket_request(
            &Method::GET,
            Version::HTTP_11,
            &upgrade
        ));
        assert!(!is_websocket_request(
            &Method::POST,
            Version::HTTP_11,
            &upgrade
        ));
        assert!(!is_websocket_request(
            &Method::GET,
            Version::HTTP_2,
            &upgrade
        ));
        assert!(!is_websocket_request(
            &Method::GET,
            Version::HTTP_11,
            &headers(&[("upgrade", "websocket")])
        ));
        assert!(!is_websocket_request(
            &Method::GET,
            Version::HTTP_11,
            &headers(&[("connection", "upgrade"), ("upgrade", "h2c")])
        ));
    }

    #[test]
    fn a_101_without_an_accepted_upgrade_is_refused_and_other_statuses_pass() {
        let head = |status: u16| {
            Response::builder()
                .status(status)
                .header("upgrade", "websocket")
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert_eq!(
            answer(None, &mut head(101)).err(),
            Some(GatewayError::UpstreamProtocol)
        );
        assert!(answer(None, &mut head(200)).unwrap().is_none());
        assert!(answer(None, &mut head(426)).unwrap().is_none());
    }

    #[tokio::test]
    async fn an_idle_tunnel_ends_after_its_timeout() {
        let (_client, mut gateway_client) = tokio::io::duplex(64);
        let (mut gateway_upstream, _upstream) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let ended = splice(
            &mut gateway_client,
            &mut gateway_upstream,
            Duration::from_millis(200),
            || 0,
        )
        .await
        .unwrap();
        assert_eq!(ended, Ended::IdleTimeout);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited <= Duration::from_millis(400),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn traffic_keeps_a_tunnel_open_and_closing_both_sides_ends_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, gateway_client) = tokio::io::duplex(64);
        let (mut gateway_upstream, mut upstream) = tokio::io::duplex(64);
        let moved = Arc::new(AtomicU64::new(0));
        let mut gateway_client = Metered::new(gateway_client, moved.clone());
        // a ping every 100ms, for longer than the 250ms timeout
        let talker = async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                client.write_all(b"ping").await.unwrap();
                let mut buf = [0u8; 4];
                upstream.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"ping");
            }
        };
        let (ended, ()) = tokio::join!(
            splice(
                &mut gateway_client,
                &mut gateway_upstream,
                Duration::from_millis(250),
                || moved.load(Ordering::Relaxed)
            ),
            talker
        );
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(moved.load(Ordering::Relaxed), 20);
    }
}
