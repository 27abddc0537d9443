//! The admin listener: liveness, readiness, metrics, the dashboard, the effective config, the
//! revocation list and rate-limit state. It binds to loopback by default and is separate from
//! client listeners, so no route can ever reach it. Everything but the probes, `/metrics`
//! (unless `observability.metrics.require_token`) and the dashboard page (which holds no data)
//! needs the bearer token from `admin.token` or `PORTCULLIS_ADMIN_TOKEN`; without one configured,
//! those endpoints refuse every request.

mod dashboard;

use std::{convert::Infallible, sync::atomic::Ordering};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    pipeline::{error_response, ResponseBody},
    proxy::{new_request_id, GatewayState},
};

/// Serves the admin API until the task is dropped.
pub async fn serve(listener: TcpListener, state: GatewayState) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(request, &state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(request: Request<Incoming>, state: &GatewayState) -> Response<ResponseBody> {
    let path = request.uri().path();
    if needs_token(path, state) {
        if let Some(refused) = check_token(&request, state) {
            return refused;
        }
    } else if (path == "/dashboard" || (path == "/metrics" && from_a_browser(&request)))
        && !addressed_by_ip(&request)
    {
        // what is served without a token must not be readable by a web page through DNS
        // rebinding (its browser would send the attacker's host name); scrapers may use names
        return error_response(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            "the admin listener answers requests addressed to an IP address or localhost",
            &new_request_id(),
        );
    }
    let method = request.method().clone();
    match (method, path) {
        (Method::GET | Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET | Method::HEAD, "/readyz") => {
            if !state.ready.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            } else if let Some(missing) = warming_up(state) {
                text(StatusCode::SERVICE_UNAVAILABLE, missing)
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (Method::GET | Method::HEAD, "/metrics") => {
            let snapshot = state.snapshot.load();
            if !snapshot.observer.metrics_enabled {
                return error_response(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "metrics are turned off (observability.metrics.enabled)",
                    &new_request_id(),
                );
            }
            dashboard::refresh_upstream_gauges(state);
            let body = snapshot.observer.telemetry.metrics.encode();
            let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (Method::GET | Method::HEAD, "/dashboard") if dashboard_enabled(state) => {
            let mut response = Response::new(ResponseBody::full(Bytes::from_static(
                dashboard::PAGE.as_bytes(),
            )));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            // the page runs only its own inline code and talks only to this listener
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                dashboard::CONTENT_SECURITY_POLICY.clone(),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            response
        }
        (Method::GET | Method::HEAD, "/dashboard/data") if dashboard_enabled(state) => {
            let mut response = json(StatusCode::OK, &dashboard::data(state));
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            response
        }
        (Method::GET | Method::HEAD, "/alerts") => json(
            StatusCode::OK,
            &serde_json::to_value(state.snapshot.load().observer.telemetry.alerts.firing())
                .unwrap_or_default(),
        ),
        (Method::GET | Method::HEAD, "/config") => {
            let snapshot = state.snapshot.load();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "generation": snapshot.generation,
                    "config": snapshot.effective_config,
                }),
            )
        }
        (Method::GET | Method::HEAD, "/revocations") => {
            json(StatusCode::OK, &state.revocations.snapshot())
        }
        (Method::POST, "/revocations") => revoke(request, state).await,
        (Method::DELETE, "/revocations") => {
            let subject = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("subject=")))
                .unwrap_or_default();
            let shared = state.snapshot.load().shared_revocations.clone();
            let lifted_shared = match &shared {
                Some(shared) => match shared.restore_subject(subject).await {
                    Ok(lifted) => lifted,
                    Err(error) => return store_unavailable(&error),
                },
                None => false,
            };
            if state.revocations.restore_subject(subject) || lifted_shared {
                text(StatusCode::NO_CONTENT, "")
            } else {
                error_response(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "that subject is not revoked",
                    &new_request_id(),
                )
            }
        }
        (Method::GET | Method::HEAD, "/ratelimits") => {
            json(StatusCode::OK, &rate_limit_state(state))
        }
        (Method::GET | Method::HEAD, "/ratelimits/suspicious") => {
            let limit = query_param(&request, "limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(50);
            match &state.snapshot.load().adaptive {
                Some(adaptive) => json(
                    StatusCode::OK,
                    &serde_json::to_value(adaptive.suspicious(limit)).unwrap_or_default(),
                ),
                None => json(StatusCode::OK, &serde_json::json!([])),
            }
        }
        (Method::DELETE, "/ratelimits/suspicious") => {
            let client = query_param(&request, "client").unwrap_or_default();
            let cleared = state
                .snapshot
                .load()
                .adaptive
                .as_ref()
                .is_some_and(|adaptive| adaptive.clear(&client));
            if cleared {
                tracing::warn!(client, "behaviour score cleared through the admin API");
                text(StatusCode::NO_CONTENT, "")
            } else {
                error_response(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no score for that client",
                    &new_request_id(),
                )
            }
        }
        (Method::DELETE, "/cache") => purge_cache(&request, state).await,
        (
            _,
            "/healthz"
            | "/readyz"
            | "/metrics"
            | "/alerts"
            | "/config"
            | "/revocations"
            | "/ratelimits"
            | "/ratelimits/suspicious"
            | "/cache",
        ) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
            &new_request_id(),
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown admin endpoint",
            &new_request_id(),
        ),
    }
}

/// `DELETE /cache?key=HOST/PATH?QUERY` or `?prefix=HOST/PATH`: drops those cached responses
/// (every route, identity and variant); `prefix=` with an empty value empties the cache.
async fn purge_cache(request: &Request<Incoming>, state: &GatewayState) -> Response<ResponseBody> {
    let (url, prefix) = match (query_param(request, "key"), query_param(request, "prefix")) {
        (Some(key), None) if !key.is_empty() => (key, false),
        (None, Some(prefix)) => (prefix, true),
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give exactly one of `key` (a URL: host, path, query) or `prefix`",
                &new_request_id(),
            )
        }
    };
    let store = state.snapshot.load().cache_store.clone();
    match store
        .purge(&crate::cache::lowercase_host(&url), prefix)
        .await
    {
        Ok(purged) => {
            tracing::info!(url, prefix, purged, "cache purged through the admin API");
            json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
        }
        Err(error) => {
            tracing::warn!(%error, "cache purge failed");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the cache store could not be purged; try again",
                &new_request_id(),
            )
        }
    }
}

/// A query parameter, percent-decoded (`client=ip%3A203.0.113.7`).
fn query_param(request: &Request<Incoming>, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    let raw = query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then_some(value)
    })?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /ratelimits`: where limits are kept and how that is going.
fn rate_limit_state(state: &GatewayState) -> serde_json::Value {
    use crate::policy::ratelimit::SharedMode;
    let snapshot = state.snapshot.load();
    let buckets = &snapshot.rate_limit_buckets;
    let shared = match &snapshot.rate_limit_shared {
        None => serde_json::Value::Null,
        Some(SharedMode::Exact(limiter)) => serde_json::json!({
            "mode": "exact",
            "redis_errors": limiter.errors.load(Ordering::Relaxed),
            "fallbacks": limiter.fallbacks.load(Ordering::Relaxed),
        }),
        Some(SharedMode::Fast(sync)) => serde_json::json!({
            "mode": "fast",
            "healthy": sync.healthy(),
            "syncs": sync.syncs.load(Ordering::Relaxed),
            "redis_errors": sync.failures.load(Ordering::Relaxed),
            "fallbacks": sync.fallbacks.load(Ordering::Relaxed),
        }),
    };
    serde_json::json!({
        "local_keys": buckets.len(),
        "evicted_while_limited": buckets.evicted_active.load(Ordering::Relaxed),
        "redis": shared,
        "adaptive": snapshot.adaptive.is_some(),
    })
}

/// Whether a browser sent the request (it adds `Origin` or `Sec-Fetch-*` headers; scrapers
/// don't).
fn from_a_browser(request: &Request<Incoming>) -> bool {
    let headers = request.headers();
    headers.contains_key(header::ORIGIN)
        || headers.contains_key("sec-fetch-site")
        || headers.contains_key("sec-fetch-mode")
}

/// Whether the request's `Host` is an IP address or `localhost` (with or without a port).
fn addressed_by_ip(request: &Request<Incoming>) -> bool {
    let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host())
    else {
        return true; // HTTP/1.0 without Host: not a browser
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn dashboard_enabled(state: &GatewayState) -> bool {
    state.snapshot.load().observer.dashboard_enabled
}

/// Probes stay open; so do `/metrics` (unless configured otherwise) and the dashboard page,
/// which holds no data.
fn needs_token(path: &str, state: &GatewayState) -> bool {
    match path {
        "/healthz" | "/readyz" => false,
        "/metrics" => state.snapshot.load().observer.metrics_require_token,
        "/dashboard" => !dashboard_enabled(state),
        _ => true,
    }
}

/// Checks `Authorization: Bearer <token>` against the admin token (compared in constant time).
/// Without a token configured, nothing that needs one is served.
fn check_token(
    request: &Request<Incoming>,
    state: &GatewayState,
) -> Option<Response<ResponseBody>> {
    let snapshot = state.snapshot.load();
    let Some(expected) = snapshot.admin_token.as_deref() else {
        let mut refused = error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no admin token is configured: set admin.token or PORTCULLIS_ADMIN_TOKEN",
            &new_request_id(),
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
        );
        return Some(refused);
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    use subtle::ConstantTimeEq;
    let digest = |text: &str| crate::policy::authn::sha256(text.as_bytes());
    if bool::from(digest(presented).ct_eq(&digest(expected))) {
        return None;
    }
    let mut refused = error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin API needs its token",
        &new_request_id(),
    );
    refused.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
    );
    Some(refused)
}

/// What the gateway still waits for before its first `ready`, if anything. Checked only until
/// it has been ready once: a reload that adds a key set must not take every replica out of
/// service at once (the new provider refuses tokens until its first fetch, and says so in the log).
fn warming_up(state: &GatewayState) -> Option<&'static str> {
    if state.warmed_up.load(Ordering::Acquire) {
        return None;
    }
    let snapshot = state.snapshot.load();
    // a probe is unauthenticated: say what is missing, not which provider
    if snapshot.providers_without_keys().next().is_some() {
        return Some("not ready: waiting for JWKS keys\n");
    }
    // serving before the revocations are known would let revoked tokens through
    if snapshot.shared_revocations.is_some() && !state.revocations.has_shared_copy() {
        return Some("not ready: waiting for the shared revocations\n");
    }
    state.warmed_up.store(true, Ordering::Release);
    None
}

/// The shared revocation store did not take the change; nothing was changed.
fn store_unavailable(error: &crate::store::StoreError) -> Response<ResponseBody> {
    tracing::warn!(%error, "revocation not stored: the shared store did not answer");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the shared revocation store did not answer; nothing was changed",
        &new_request_id(),
    )
}

/// `POST /revocations` with `{"jti": "...", "exp": 1767225600}` or `{"subject": "..."}`.
async fn revoke(request: Request<Incoming>, state: &GatewayState) -> Response<ResponseBody> {
    use http_body_util::BodyExt;
    let bad = |message: &str| {
        error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            message,
            &new_request_id(),
        )
    };
    let Ok(body) = http_body_util::Limited::new(request.into_body(), 16 * 1024)
        .collect()
        .await
    else {
        return bad("the body could not be read (at most 16 KiB)");
    };
    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return bad("expected a JSON object");
    };
    let now = crate::policy::authn::unix_now();
    // with a shared store, Redis is written first: a revocation that did not reach it would be
    // undone at this replica's next sync, and never reach the others
    let shared = state.snapshot.load().shared_revocations.clone();
    match (
        entry.get("jti").and_then(|v| v.as_str()),
        entry.get("subject").and_then(|v| v.as_str()),
    ) {
        (Some(jti), None) if !jti.is_empty() => {
            let expires_at = entry.get("exp").and_then(serde_json::Value::as_u64);
            if let Some(shared) = &shared {
                if let Err(error) = shared.revoke_token(jti, expires_at).await {
                    return store_unavailable(&error);
                }
            }
            state.revocations.revoke_token(jti, expires_at, now);
            tracing::warn!(jti, "token revoked through the admin API");
        }
        (None, Some(subject)) if !subject.is_empty() => {
            if let Some(shared) = &shared {
                if let Err(error) = shared.revoke_subject(subject).await {
                    return store_unavailable(&error);
                }
            }
            state.revocations.revoke_subject(subject);
            tracing::warn!(subject, "subject revoked through the admin API");
        }
        _ => return bad("give exactly one of `jti` or `subject`"),
    }
    text(StatusCode::NO_CONTENT, "")
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
