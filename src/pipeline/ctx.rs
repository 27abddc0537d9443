//! The per-request record every phase writes to and the access log reads (one place, one shape).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Method, Version};

/// What happened to one request, filled in as it moves through the phases.
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: HeaderValue,
    pub started: Instant,
    /// The direct TCP peer.
    pub peer: SocketAddr,
    /// The client, after trusted-proxy resolution of `X-Forwarded-For`.
    pub client_ip: IpAddr,
    pub listener: Arc<str>,
    pub tls: bool,
    pub method: Method,
    pub version: Version,
    pub host: Box<str>,
    pub path: Box<str>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub target: Option<Arc<str>>,
    pub status: u16,
    pub retries: u32,
    /// What the response cache did (routes with a `cache` section).
    pub cache: Option<crate::cache::CacheStatus>,
    pub upstream_latency: Option<Duration>,
    pub bytes_out: u64,
    /// Short machine-readable reason when the gateway itself answered with an error.
    pub error: Option<&'static str>,
    /// The response body ended with an error (upstream reset, client gone).
    pub response_aborted: bool,
    pub user_agent: Option<HeaderValue>,
    /// Who the request was authenticated as.
    pub identity: Option<Arc<crate::policy::authn::Identity>>,
    /// Why authentication failed (for the log; the client sees only the challenge).
    pub auth_failure: Option<&'static str>,
    /// The authorization decision and what it rests on.
    pub authorization: Option<crate::policy::authz::Decision>,
    /// What the rate limits decided.
    pub rate_limit: crate::policy::ratelimit::Record,
    /// In-flight permits of the route and upstream, held until the response has been sent.
    pub in_flight: Vec<crate::policy::ratelimit::InFlightPermit>,
    /// The query string as received (kept only when the access log is on; redacted there).
    pub query: Option<Box<str>>,
    /// The declared request body size (`Content-Length`).
    pub bytes_in: Option<u64>,
    /// The request's place in a distributed trace.
    pub trace: Option<crate::telemetry::trace::TraceContext>,
    /// `TLSv1.3` or `TLSv1.2` on TLS listeners.
    pub tls_version: Option<&'static str>,
    /// The verified client certificate's subject (common name, else first SAN).
    pub client_cert_subject: Option<Box<str>>,
    /// Headers the access log was configured to show (already redacted).
    pub logged_request_headers: Vec<(http::HeaderName, String)>,
    pub logged_response_headers: Vec<(http::HeaderName, String)>,
    /// The matched route's metric handles and tallies.
    pub route_observer: Option<Arc<crate::telemetry::RouteObserver>>,
    /// Counts the request in flight while it lives.
    pub in_flight_gauge: Option<crate::telemetry::InFlightGauge>,
    /// Finishes the record (metrics, access log) exactly once: when the response has been sent,
    /// or — if the client went away before the response head — when the record is dropped.
    pub observer: Option<Arc<crate::telemetry::Observer>>,
    /// When the request's phases ran (kept only for traces that are exported).
    pub phases: Option<Vec<PhaseTiming>>,
    /// The route's payload capture settings, and what was captured (`capture_payload`).
    pub capture: Option<Arc<crate::telemetry::payload::CapturePolicy>>,
    pub request_capture: Option<crate::telemetry::payload::SharedCapture>,
    pub response_capture: Option<Box<crate::telemetry::payload::CapturedBody>>,
    /// When the `101` of a WebSocket tunnel was handed to the connection. Latency metrics stop
    /// here (a tunnel's life is not request latency); the access log's duration spans the tunnel.
    pub upgraded_at: Option<Instant>,
}

/// One phase of a request, for its trace span.
#[derive(Debug, Clone, Copy)]
pub struct PhaseTiming {
    pub name: &'static str,
    pub started: Instant,
    pub ended: Instant,
}

/// Who sent a request and how: what is known of it before any phase ran.
pub struct Arrival {
    pub request_id: HeaderValue,
    pub peer: SocketAddr,
    pub client_ip: IpAddr,
    pub listener: Arc<str>,
    pub tls: bool,
    pub method: Method,
    pub version: Version,
    pub user_agent: Option<HeaderValue>,
    pub tls_version: Option<&'static str>,
}

impl RequestCtx {
    /// The record of a request that has just arrived; the phases fill in the rest.
    pub fn new(arrival: Arrival) -> Self {
        Self {
            request_id: arrival.request_id,
            started: Instant::now(),
            peer: arrival.peer,
            client_ip: arrival.client_ip,
            listener: arrival.listener,
            tls: arrival.tls,
            method: arrival.method,
            version: arrival.version,
            host: Box::from(""),
            path: Box::from(""),
            route: None,
            upstream: None,
            target: None,
            status: 0,
            retries: 0,
            cache: None,
            upstream_latency: None,
            bytes_out: 0,
            error: None,
            response_aborted: false,
            user_agent: arrival.user_agent,
            identity: None,
            auth_failure: None,
            authorization: None,
            rate_limit: Default::default(),
            in_flight: Vec::new(),
            query: None,
            bytes_in: None,
            trace: None,
            tls_version: arrival.tls_version,
            client_cert_subject: None,
            logged_request_headers: Vec::new(),
            logged_response_headers: Vec::new(),
            route_observer: None,
            in_flight_gauge: None,
            observer: None,
            phases: None,
            capture: None,
            request_capture: None,
            response_capture: None,
            upgraded_at: None,
        }
    }

    /// The start of a phase, when phases are being timed.
    pub fn phase_start(&self) -> Option<Instant> {
        self.phases.as_ref().map(|_| Instant::now())
    }

    /// Records a phase that began at `started` (from [`Self::phase_start`]).
    pub fn phase_end(&mut self, name: &'static str, started: Option<Instant>) {
        if let (Some(phases), Some(started)) = (&mut self.phases, started) {
            phases.push(PhaseTiming {
                name,
                started,
                ended: Instant::now(),
            });
        }
    }
}

/// Finishes a request when the response body ends: metrics, the access-log line, and the
/// connection's in-flight marker released.
pub struct Completion {
    pub ctx: RequestCtx,
    _in_flight: InFlightGuard,
}

impl Completion {
    pub fn new(ctx: RequestCtx, in_flight: InFlightGuard) -> Box<Self> {
        Box::new(Self {
            ctx,
            _in_flight: in_flight,
        })
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.ctx.finish();
    }
}

impl RequestCtx {
    /// Reports the request once (later calls do nothing).
    pub fn finish(&mut self) {
        if let Some(observer) = self.observer.take() {
            // permits first: the next request may take them while this one is being logged
            self.in_flight.clear();
            observer.finish(self);
        }
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if self.observer.is_some() {
            // dropped before a response was made: the client went away while the request was
            // being handled (an HTTP/2 reset, a closed connection during a slow upstream call)
            self.response_aborted = true;
            if self.status == 0 {
                self.status = 499;
                self.error.get_or_insert("client_closed_request");
            }
            self.finish();
        }
    }
}

/// Per-connection activity shared by the connection's I/O wrapper and its request handler, so the
/// idle and header timeouts know whether a request is in flight.
#[derive(Debug, Default)]
pub struct ConnActivity {
    in_flight: AtomicU32,
    /// Requests whose head hyper has fully parsed (handler entered).
    started: AtomicU32,
}

impl ConnActivity {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn started(&self) -> u32 {
        self.started.load(Ordering::Acquire)
    }
}

/// Marks a request in flight on its connection until dropped.
#[derive(Debug)]
pub struct InFlightGuard(Arc<ConnActivity>);

impl InFlightGuard {
    pub fn enter(activity: &Arc<ConnActivity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.started.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
