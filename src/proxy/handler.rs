//! One request, start to finish: the phases in order.
//!
//! ```text
//! framing check → normalise path → route → body limit → policy chain → rewrite + forwarding
//! headers → upstream (LB, retries, timeouts) → response headers → access log (when the body ends)
//! ```

use std::{net::SocketAddr, sync::Arc};

use http::{header, HeaderValue, Request, Response, Version};

use super::{
    caching,
    conn::ConnFlags,
    forwarding, grpc_web,
    snapshot::{HostRewrite, Route, Snapshot},
    upgrade::{self, ClientUpgrade},
};
use crate::pipeline::ClientBody;
use crate::{
    cache::{CacheStatus, X_CACHE},
    pipeline::{
        Arrival, Completion, ConnActivity, GatewayError, InFlightGuard, RequestCtx, ResponseBody,
        UpstreamBody, X_REQUEST_ID,
    },
    policy::{self, Flow},
    route::{normalize_path, request_host},
    telemetry::{
        payload::CapturedBody,
        trace::{TraceContext, TRACEPARENT, TRACESTATE},
    },
    upstream::{HashKey, UpstreamResponseBody},
};

const DPOP: http::HeaderName = http::HeaderName::from_static("dpop");
const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");
const X_ORIGINAL_URL: http::HeaderName = http::HeaderName::from_static("x-original-url");
const X_REWRITE_URL: http::HeaderName = http::HeaderName::from_static("x-rewrite-url");

/// What a request handler knows about its connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// The TLS client certificate the handshake verified, if any.
    pub client_certificate: Option<Arc<crate::policy::authn::ClientCertificate>>,
    pub peer: SocketAddr,
    /// The peer's address pre-formatted for the forwarding headers.
    pub peer_address: forwarding::PeerAddress,
    pub listener: Arc<str>,
    pub tls: bool,
    /// `TLSv1.3` / `TLSv1.2` on TLS connections.
    pub tls_version: Option<&'static str>,
    pub activity: Arc<ConnActivity>,
    pub flags: Arc<ConnFlags>,
}

/// Handles one request on `snapshot` (loaded once by the caller and kept for the whole request).
pub async fn handle(
    request: Request<ClientBody>,
    conn: &ConnInfo,
    snapshot: Arc<Snapshot>,
) -> Response<ResponseBody> {
    let in_flight = InFlightGuard::enter(&conn.activity);
    let trusted_peer = forwarding::is_trusted(conn.peer.ip(), &snapshot.trusted_proxies);
    let mut ctx = RequestCtx::new(Arrival {
        request_id: forwarding::request_id(request.headers(), trusted_peer),
        peer: conn.peer,
        client_ip: forwarding::client_ip(
            conn.peer.ip(),
            request.headers(),
            &snapshot.trusted_proxies,
        ),
        listener: conn.listener.clone(),
        tls: conn.tls,
        method: request.method().clone(),
        version: request.version(),
        user_agent: request.headers().get(header::USER_AGENT).cloned(),
        tls_version: conn.tls_version,
    });
    let observer = &snapshot.observer;
    ctx.in_flight_gauge = Some(observer.begin());
    ctx.observer = Some(observer.clone());
    if observer.access_log.enabled {
        ctx.query = request.uri().query().map(Into::into);
        ctx.bytes_in = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        ctx.client_cert_subject = conn.client_certificate.as_ref().and_then(|c| {
            c.common_name
                .as_deref()
                .or(c.uri_sans.first().map(String::as_str))
                .or(c.dns_sans.first().map(String::as_str))
                .map(Into::into)
        });
        if observer.access_log.wants_request_headers() {
            ctx.logged_request_headers =
                observer.access_log.pick_request_headers(request.headers());
        }
    }
    if observer.propagate_traces {
        ctx.trace = Some(TraceContext::from_request(
            request.headers(),
            observer.trust_client_traces || trusted_peer,
            observer.trace_sample_ratio,
        ));
        if observer.times_phases(&ctx) {
            ctx.phases = Some(Vec::with_capacity(6));
        }
    }
    // a gRPC client reads errors from `grpc-status`, so the gateway's own answer it that way
    let grpc_content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .filter(|v| v.as_bytes().starts_with(b"application/grpc"))
        .cloned();
    // the status the record keeps: a gRPC client is told an error in `grpc-status` with HTTP 200,
    // but the log, the metrics and the adaptive limits must see it as the error it was
    let mut recorded_status = None;
    let mut response = match proxy(request, conn, &snapshot, trusted_peer, &mut ctx).await {
        Ok(response) => response,
        Err(error) => {
            ctx.error = Some(error.code());
            recorded_status = Some(error.status());
            if error.status().is_server_error() {
                tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or_default(), %error, "request failed");
            }
            let mut response = match grpc_content_type {
                Some(content_type) => error.into_grpc_response(&ctx.request_id, content_type),
                None => error.into_response(&ctx.request_id),
            };
            if matches!(error, GatewayError::BadRequest(_)) && ctx.version <= Version::HTTP_11 {
                // a client that sends malformed requests does not keep its connection
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID, ctx.request_id.clone());
    if ctx.rate_limit.send_headers {
        if let Some(outcome) = &ctx.rate_limit.outcome {
            let (policy, state) = outcome.headers();
            let headers = response.headers_mut();
            headers.insert(RATELIMIT_POLICY, policy);
            if let Some(state) = state {
                headers.insert(RATELIMIT, state);
            }
        }
    }
    ctx.status = recorded_status.unwrap_or(response.status()).as_u16();
    if let Some(adaptive) = &snapshot.adaptive {
        adaptive.observe(&ctx);
    }
    if snapshot.observer.access_log.wants_response_headers() {
        ctx.logged_response_headers = snapshot
            .observer
            .access_log
            .pick_response_headers(response.headers());
    }
    upgrade::complete(response, Completion::new(ctx, in_flight))
}

async fn proxy(
    request: Request<ClientBody>,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    trusted_peer: bool,
    ctx: &mut RequestCtx,
) -> Result<Response<ResponseBody>, GatewayError> {
    // 1. framing: both Content-Length and Transfer-Encoding is the classic smuggling shape
    if conn
        .flags
        .framing_conflict
        .swap(false, std::sync::atomic::Ordering::AcqRel)
    {
        return Err(GatewayError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    // a pipelined request's head was never scanned: if it uses Transfer-Encoding, a hidden
    // Content-Length cannot be ruled out, so it is refused (clients practically never pipeline
    // chunked uploads)
    if request.version() <= Version::HTTP_11
        && request.headers().contains_key(header::TRANSFER_ENCODING)
        && conn.activity.started()
            > conn
                .flags
                .heads_scanned
                .load(std::sync::atomic::Ordering::Acquire)
    {
        return Err(GatewayError::BadRequest(
            "pipelined request with Transfer-Encoding",
        ));
    }
    let Some(listener) = snapshot.listener(&conn.listener) else {
        // the listener was removed by a reload while this connection stayed open
        return Err(GatewayError::ShuttingDown);
    };
    let (mut parts, body) = request.into_parts();
    if parts.version == Version::HTTP_11
        && !parts.headers.contains_key(header::HOST)
        && parts.uri.authority().is_none()
    {
        return Err(GatewayError::BadRequest("missing Host header"));
    }
    if parts.headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(GatewayError::BadRequest("more than one Host header"));
    }

    // 2. normalise the path, so routing and policies see what the upstream will see
    ctx.path = match normalize_path(parts.uri.path()) {
        Ok(path) => path.into(),
        Err(_) => {
            // log what was asked for (bounded), then refuse
            let raw = parts.uri.path();
            let mut end = raw.len().min(256);
            while !raw.is_char_boundary(end) {
                end -= 1; // found by fuzzing: paths may carry UTF-8
            }
            ctx.path = raw[..end].into();
            return Err(GatewayError::BadRequest("invalid request path"));
        }
    };
    ctx.host = request_host(&parts.uri, &parts.headers).into();

    // 3. route
    let route = snapshot
        .routes
        .find(
            listener.index,
            &ctx.host,
            &parts.method,
            &ctx.path,
            &parts.headers,
        )
        .ok_or(GatewayError::NoRoute)?
        .clone();
    ctx.route = Some(route.name.clone());
    ctx.upstream = Some(route.upstream.name.clone());
    ctx.route_observer = Some(route.observer.clone());
    if snapshot.observer.access_log.enabled {
        ctx.capture = route.capture.clone();
    }

    // 4. body limit: refuse early what is declared too large; the stream is capped as it flows
    let max_body = route
        .max_body
        .map_or(listener.max_body, |m| m.min(listener.max_body));
    if let Some(length) = parts.headers.get(header::CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or(GatewayError::BadRequest("invalid Content-Length"))?;
        if length > max_body {
            return Err(GatewayError::PayloadTooLarge);
        }
    }

    // a WebSocket upgrade the route allows (read before the hop-by-hop headers go)
    let client_upgrade = ClientUpgrade::accept(&route, &mut parts);

    // 5. hop-by-hop headers go before any policy runs: a client's `Connection` header must not be
    //    able to remove what a policy sets (identity headers), nor hide what a policy reads
    forwarding::strip_hop_by_hop(&mut parts.headers, true);
    // headers some frameworks take as the "real" URL: a client must not pick the upstream's path
    for name in [X_ORIGINAL_URL, X_REWRITE_URL] {
        if parts.headers.contains_key(&name) {
            parts.headers.remove(name);
        }
    }

    // the scheme the request came with, for DPoP proofs (which name the full URL); only when a
    // proof is present, as the first extension costs an allocation
    if parts.headers.contains_key(DPOP) {
        let scheme = if conn.tls { "https" } else { "http" };
        parts
            .extensions
            .insert(crate::policy::authn::RequestScheme(scheme));
    }
    if let Some(certificate) = &conn.client_certificate {
        // for mTLS authentication and certificate-bound tokens
        parts.extensions.insert(certificate.clone());
    }

    // 6. policies (authentication, authorization, limits ...) may answer before the upstream
    if let Flow::Respond(response) =
        policy::run_request_phase(&route.policies, ctx, &mut parts).await?
    {
        return Ok(*response);
    }

    // load shedding: the route's and the upstream's caps on requests in flight, taken once the
    // request has passed its policies (an unauthenticated flood cannot hold them)
    for limit in [&route.max_in_flight, &route.upstream_max_in_flight]
        .into_iter()
        .flatten()
    {
        ctx.in_flight
            .push(limit.try_acquire().ok_or(GatewayError::Overloaded)?);
    }

    // 7. the upstream request: path rewrite, forwarding headers
    // the host the client asked for, before the URI is rewritten to the upstream's path
    let absolute_form = parts.uri.authority().is_some();
    let original_host = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(header::HOST).cloned());
    // the scheme and port the client used, for cache keys (the upstream sees both)
    let origin = route
        .cache
        .as_ref()
        .map(|_| caching::origin_of(conn.tls, original_host.as_ref()));
    let rewritten = rewrite_path(&route, &ctx.path);
    if rewritten != parts.uri.path() {
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{rewritten}?{query}"),
            None => rewritten.into_owned(),
        };
        parts.uri = path_and_query
            .parse()
            .map_err(|_| GatewayError::BadRequest("invalid request target"))?;
    }
    forwarding::set_forwarding_headers(
        &mut parts.headers,
        &forwarding::ForwardedFor {
            peer: &conn.peer_address,
            trusted_peer,
            tls: conn.tls,
            host: original_host.as_ref(),
        },
    );
    parts.headers.insert(X_REQUEST_ID, ctx.request_id.clone());
    if let Some(upgrade) = &client_upgrade {
        upgrade.offer(&mut parts.headers);
    }
    if let Some(trace) = &ctx.trace {
        // the upstream's parent is the gateway's span; `tracestate` belongs to the trace it came
        // with, so it passes only when that trace was continued
        parts.headers.insert(TRACEPARENT, trace.upstream_header());
        if trace.parent_id.is_none() {
            parts.headers.remove(TRACESTATE);
        }
    }
    match &route.host {
        HostRewrite::Keep => {
            // HTTP/1.1 carries it in `Host` already; HTTP/2 and absolute-form in the URI
            if absolute_form || !parts.headers.contains_key(header::HOST) {
                if let Some(host) = original_host {
                    parts.headers.insert(header::HOST, host);
                }
            }
        }
        HostRewrite::Value(value) => {
            parts.headers.insert(header::HOST, value.clone());
        }
        HostRewrite::Target => {}
    }
    parts.version = Version::HTTP_11;
    let compression = crate::compression::negotiate(
        route.compression.as_ref(),
        listener.compression.as_ref(),
        &parts,
    );
    let hash_key = hash_key(&route, &parts.headers, ctx);
    let grpc_web = if route.grpc_web {
        grpc_web::Mode::of(&parts.headers)
    } else {
        None
    };
    let mut body = match grpc_web {
        Some(mode) => grpc_web::request(&mut parts.headers, body, mode, max_body).await?,
        None => UpstreamBody::client(body, max_body),
    };
    if let Some(capture) = ctx.capture.as_ref().filter(|c| c.request) {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(CapturedBody::new(
            capture.max_bytes,
            parts.headers.get(header::CONTENT_TYPE),
        )));
        body = body.with_capture(shared.clone());
        ctx.request_capture = Some(shared);
    }
    if let Some(composition) = &route.compose {
        // answered by the composition's calls; a client body has nowhere to go
        drop(body);
        let response = respond_composed(composition, &parts.headers, ctx).await?;
        return Ok(compressed(response, compression.as_ref()));
    }
    let upstream_request = Request::from_parts(parts, body);

    // 8. forward, through the cache when the route has one and the request may use it (never
    //    an upgrade: a tunnel is not a response to store)
    if let Some(cache) = &route.cache {
        if let (None, Some(origin), true) = (
            &client_upgrade,
            origin,
            caching::is_cacheable(&upstream_request),
        ) {
            let response =
                caching::serve(cache, &route, upstream_request, hash_key, origin, ctx).await?;
            return Ok(compressed(response, compression.as_ref()));
        }
        cache.count(CacheStatus::Bypass);
        ctx.cache = Some(CacheStatus::Bypass);
    }
    let response = forward(&route, upstream_request, hash_key.as_deref(), ctx).await?;

    // 9. the response: a tunnel for an accepted upgrade, else minus hop-by-hop headers
    let (mut parts, body) = response.into_parts();
    // a 101 opens a tunnel only for an upgrade this route accepted (read before the hop-by-hop
    // headers go)
    let tunnel = upgrade::answer(client_upgrade, &mut parts)?;
    forwarding::strip_hop_by_hop(&mut parts.headers, false);
    parts.version = Version::HTTP_11;
    if let Some(tunnel) = tunnel {
        return Ok(tunnel.response(parts));
    }
    if let Some(mode) = grpc_web {
        grpc_web::response_headers(&mut parts.headers, mode);
        let body = grpc_web::GrpcWebBody::new(body, mode);
        return Ok(Response::from_parts(parts, ResponseBody::transformed(body)));
    }
    if let Some(capture) = ctx.capture.as_ref().filter(|c| c.response) {
        ctx.response_capture = Some(Box::new(CapturedBody::new(
            capture.max_bytes,
            parts.headers.get(header::CONTENT_TYPE),
        )));
    }
    if route.cache.is_some() {
        parts.headers.insert(X_CACHE, CacheStatus::Bypass.header());
    }
    let response = Response::from_parts(parts, ResponseBody::upstream(body));
    Ok(compressed(response, compression.as_ref()))
}

/// The response, compressed when the client and the route or listener agreed on an encoding.
fn compressed(
    response: Response<ResponseBody>,
    compression: Option<&crate::compression::Negotiated<'_>>,
) -> Response<ResponseBody> {
    let Some(compression) = compression else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    let body = compression.apply(&mut parts, body);
    Response::from_parts(parts, body)
}

/// Runs a route's composition and answers with its JSON.
async fn respond_composed(
    composition: &crate::compose::Composition,
    headers: &http::HeaderMap,
    ctx: &mut RequestCtx,
) -> Result<Response<ResponseBody>, GatewayError> {
    let started = std::time::Instant::now();
    let subject = ctx.identity.as_ref().map(|i| &*i.subject);
    let composed = composition.run(&ctx.path, subject, headers).await;
    ctx.upstream_latency = Some(started.elapsed());
    ctx.phase_end("upstream", ctx.phases.as_ref().map(|_| started));
    let composed = composed?;
    let mut response = Response::new(ResponseBody::full(composed.body));
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // composed per request and identity: not for shared caches
    response_headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if let Some(failed) = composed.failed {
        response_headers.insert(crate::compose::X_COMPOSE_PARTIAL, failed);
    }
    Ok(response)
}

/// Sends the request to the route's upstream (load balancing, retries, timeouts), records the
/// outcome in `ctx`, and returns the upstream's response as it came (hop-by-hop headers are the
/// caller's to remove, after it has read what an upgrade needs from them).
pub(super) async fn forward(
    route: &Route,
    request: Request<UpstreamBody>,
    hash_key: Option<&[u8]>,
    ctx: &mut RequestCtx,
) -> Result<Response<UpstreamResponseBody>, GatewayError> {
    let forwarded = route
        .upstream
        .forward(request, hash_key, matches!(route.host, HostRewrite::Target))
        .await;
    let forwarded = match forwarded {
        Ok(forwarded) => forwarded,
        Err(failure) => {
            ctx.upstream_latency = Some(failure.started.elapsed());
            ctx.phase_end("upstream", ctx.phases.as_ref().map(|_| failure.started));
            ctx.target = failure.target;
            ctx.retries = failure.retries;
            return Err(failure.error);
        }
    };
    ctx.upstream_latency = Some(forwarded.started.elapsed());
    ctx.phase_end("upstream", ctx.phases.as_ref().map(|_| forwarded.started));
    ctx.target = Some(forwarded.target);
    ctx.retries = forwarded.retries;

    Ok(forwarded.response)
}

/// Applies `strip_prefix` then `add_prefix` to the normalised path.
fn rewrite_path<'p>(route: &Route, path: &'p str) -> std::borrow::Cow<'p, str> {
    let mut path = std::borrow::Cow::Borrowed(path);
    if let Some(prefix) = &route.strip_prefix {
        if let Some(rest) = path.strip_prefix(&**prefix) {
            if rest.is_empty() || rest.starts_with('/') {
                path = std::borrow::Cow::Owned(if rest.is_empty() {
                    "/".to_owned()
                } else {
                    rest.to_owned()
                });
            }
        }
    }
    if let Some(prefix) = &route.add_prefix {
        path = std::borrow::Cow::Owned(if path == "/" {
            prefix.to_string()
        } else {
            format!("{prefix}{path}")
        });
    }
    path
}

fn hash_key(route: &Route, headers: &http::HeaderMap, ctx: &RequestCtx) -> Option<Vec<u8>> {
    match route.upstream.hash_on.as_ref()? {
        HashKey::Header(name) => headers.get(name).map(|v| v.as_bytes().to_vec()),
        HashKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                (key == &**name).then(|| value.as_bytes().to_vec())
            }),
        HashKey::ClientIp => Some(ctx.client_ip.to_string().into_bytes()),
    }
}
