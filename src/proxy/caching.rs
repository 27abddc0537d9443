//! A cacheable request's way through the response cache: look up (after every policy ran), serve
//! fresh or stale, revalidate with a conditional request, or fetch once for all concurrent
//! misses and store what may be stored.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::{handler::forward, snapshot::Route};
use crate::{
    cache::{self, CacheStatus, Entry, RouteCache, Standing, Turn, VariantKey, X_CACHE},
    pipeline::{GatewayError, RequestCtx, ResponseBody, UpstreamBody},
    upstream::UpstreamResponseBody,
};

/// Whether the cache may answer this request at all: a `GET` without a body or a `Range`.
pub fn is_cacheable(request: &Request<UpstreamBody>) -> bool {
    request.method() == Method::GET
        && matches!(request.body(), UpstreamBody::Empty)
        && !request.headers().contains_key(header::RANGE)
}

/// The URL entries are stored and purged under: host, normalised path, query.
fn cache_url(ctx: &RequestCtx, request: &Request<UpstreamBody>) -> String {
    let query = request.uri().query();
    let mut url =
        String::with_capacity(ctx.host.len() + ctx.path.len() + query.map_or(0, |q| q.len() + 1));
    url.push_str(&ctx.host); // lowercased, without the port
    url.push_str(&ctx.path);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// The client's conditional headers: answered here from the entry, never sent upstream (the
/// gateway needs full responses to store).
fn take_conditionals(headers: &mut HeaderMap) -> HeaderMap {
    let mut conditionals = HeaderMap::new();
    for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        if let Some(value) = headers.remove(&name) {
            conditionals.insert(name, value);
        }
    }
    headers.remove(header::IF_MATCH);
    headers.remove(header::IF_UNMODIFIED_SINCE);
    headers.remove(header::IF_RANGE);
    conditionals
}

/// Everything about one lookup that outlives the borrowed request (for a background refresh).
struct Lookup {
    cache: Arc<RouteCache>,
    route: Arc<Route>,
    url: String,
    identity: Option<Box<str>>,
    /// The request carried credentials and the entry would serve other identities.
    shared_with_credentials: bool,
    hash_key: Option<Vec<u8>>,
}

/// Serves a cacheable request (see [`is_cacheable`]) on a route with a cache.
pub async fn serve(
    cache: &Arc<RouteCache>,
    route: &Arc<Route>,
    request: Request<UpstreamBody>,
    hash_key: Option<Vec<u8>>,
    ctx: &mut RequestCtx,
) -> Result<Response<ResponseBody>, GatewayError> {
    let (response, status) = look_up(cache, route, request, hash_key, ctx).await?;
    cache.count(status);
    ctx.cache = Some(status);
    Ok(response)
}

async fn look_up(
    cache: &Arc<RouteCache>,
    route: &Arc<Route>,
    mut request: Request<UpstreamBody>,
    hash_key: Option<Vec<u8>>,
    ctx: &mut RequestCtx,
) -> Result<(Response<ResponseBody>, CacheStatus), GatewayError> {
    let conditionals = take_conditionals(request.headers_mut());
    let identity = cache.identity_of(ctx.identity.as_deref());
    let lookup = Lookup {
        cache: cache.clone(),
        route: route.clone(),
        url: cache_url(ctx, &request),
        shared_with_credentials: identity.is_none()
            && (ctx.identity.is_some() || request.headers().contains_key(header::AUTHORIZATION)),
        identity,
        hash_key,
    };
    let fetch_key = cache::fetch_key(&lookup.url, &route.name, lookup.identity.as_deref());
    let mut entry = lookup.find(request.headers()).await;
    if entry.is_none() {
        match cache.coalescer.join(fetch_key.clone()) {
            Turn::Follow(receiver) => {
                // another request is fetching this variant: wait for it, then look again
                cache::follow(receiver, route.upstream.total_timeout).await;
                entry = lookup.find(request.headers()).await;
            }
            Turn::Lead(guard) => {
                let response = lookup.fetch(request, None, Some(ctx)).await;
                drop(guard);
                return response.map(|r| finish(r, &conditionals));
            }
        }
    }
    let Some(entry) = entry else {
        // the fetch we waited for stored nothing (not storable, or failed): our own
        let response = lookup.fetch(request, None, Some(ctx)).await;
        return response.map(|r| finish(r, &conditionals));
    };
    let now = SystemTime::now();
    match entry.standing(now) {
        Standing::Fresh => Ok((
            answer(&entry, &conditionals, CacheStatus::Hit, now),
            CacheStatus::Hit,
        )),
        Standing::StaleServable => {
            if let Turn::Lead(guard) = cache.coalescer.join(fetch_key) {
                let stale = entry.clone();
                tokio::spawn(async move {
                    let _ = lookup.fetch(request, Some(&stale), None).await;
                    drop(guard);
                });
            }
            Ok((
                answer(&entry, &conditionals, CacheStatus::Stale, now),
                CacheStatus::Stale,
            ))
        }
        Standing::MustRevalidate => {
            let response = lookup.fetch(request, Some(&entry), Some(ctx)).await;
            response.map(|r| finish(r, &conditionals))
        }
    }
}

/// What a fetch produced: a stored (or refreshed) entry to answer from, or a response that
/// streams through.
enum Fetched {
    Entry(Arc<Entry>, CacheStatus),
    Passed(Box<Response<ResponseBody>>),
}

impl Lookup {
    async fn find(&self, headers: &HeaderMap) -> Option<Arc<Entry>> {
        let key = VariantKey {
            route: &self.route.name,
            identity: self.identity.as_deref(),
            headers,
        };
        self.cache.store.get(&self.url, &key).await
    }

    /// Fetches from the upstream — conditionally when `stale` has validators — and stores what
    /// may be stored. `ctx` is the client's request record (none for a background refresh).
    async fn fetch(
        &self,
        mut request: Request<UpstreamBody>,
        stale: Option<&Arc<Entry>>,
        ctx: Option<&mut RequestCtx>,
    ) -> Result<Fetched, GatewayError> {
        if let Some(stale) = stale {
            for (name, value) in stale.validators() {
                request.headers_mut().insert(name, value);
            }
        }
        let vary_request = request.headers().clone();
        let response = match ctx {
            Some(ctx) => forward(&self.route, request, self.hash_key.as_deref(), ctx).await?,
            None => {
                self.route
                    .upstream
                    .forward(request, self.hash_key.as_deref(), false)
                    .await
                    .map_err(|failure| failure.error)?
                    .response
            }
        };
        let now = SystemTime::now();
        let (mut parts, body) = response.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // no upgrade was asked for: never pass a 101 on without the tunnel behind it
            return Err(GatewayError::UpstreamProtocol);
        }
        super::forwarding::strip_hop_by_hop(&mut parts.headers, false);
        parts.version = http::Version::HTTP_11;
        if let (Some(stale), StatusCode::NOT_MODIFIED) = (stale, parts.status) {
            let mut merged = stale.headers.clone();
            for name in parts.headers.keys() {
                merged.remove(name);
            }
            for (name, value) in &parts.headers {
                merged.append(name.clone(), value.clone());
            }
            if let Ok(lifetime) = self.cache.freshness.lifetime(
                stale.status,
                &merged,
                self.shared_with_credentials,
                now,
            ) {
                let refreshed = Arc::new(stale.refreshed(&parts.headers, lifetime, now));
                self.cache.store.put(&self.url, refreshed.clone()).await;
                return Ok(Fetched::Entry(refreshed, CacheStatus::Revalidated));
            }
            // the 304 made it unstorable (e.g. now `no-store`): serve this once, forget it
            self.cache.store.remove_variant(&self.url, stale).await;
            let once = Entry {
                headers: merged,
                ..Entry::clone(stale)
            };
            return Ok(Fetched::Entry(Arc::new(once), CacheStatus::Revalidated));
        }
        let lifetime = match self.cache.freshness.lifetime(
            parts.status,
            &parts.headers,
            self.shared_with_credentials,
            now,
        ) {
            Ok(lifetime) => lifetime,
            Err(reason) => {
                tracing::trace!(?reason, url = %self.url, "response not stored");
                if let Some(stale) = stale {
                    self.cache.store.remove_variant(&self.url, stale).await;
                }
                return Ok(Fetched::Passed(Box::new(Response::from_parts(
                    parts,
                    ResponseBody::upstream(body),
                ))));
            }
        };
        let deadline = self.route.upstream.total_timeout;
        let body = match read_body(body, self.cache.max_entry_bytes, deadline).await? {
            ReadBody::Complete(bytes) => bytes,
            ReadBody::Partial {
                head,
                rest,
                trailers,
            } => {
                return Ok(Fetched::Passed(Box::new(Response::from_parts(
                    parts,
                    ResponseBody::replay(head, rest.map(|r| *r), trailers),
                ))))
            }
        };
        let vary = vary_of(&parts.headers, &vary_request);
        let entry = Arc::new(Entry {
            status: parts.status,
            headers: std::mem::take(&mut parts.headers),
            body,
            stored_at: now,
            lifetime,
            route: (*self.route.name).into(),
            identity: self.identity.clone(),
            vary,
        });
        self.cache.store.put(&self.url, entry.clone()).await;
        Ok(Fetched::Entry(entry, CacheStatus::Miss))
    }
}

/// The request header values the response's `Vary` names.
fn vary_of(
    response: &HeaderMap,
    request: &HeaderMap,
) -> Vec<(http::HeaderName, Option<HeaderValue>)> {
    let mut vary = Vec::new();
    for value in response.get_all(header::VARY) {
        for name in value.to_str().unwrap_or_default().split(',') {
            if let Ok(name) = http::HeaderName::from_bytes(name.trim().as_bytes()) {
                if !vary.iter().any(|(n, _)| *n == name) {
                    let value = request.get(&name).cloned();
                    vary.push((name, value));
                }
            }
        }
    }
    vary
}

enum ReadBody {
    Complete(Bytes),
    /// Too large to store, or ended in trailers (not stored): what was read, and the rest.
    Partial {
        head: Bytes,
        rest: Option<Box<UpstreamResponseBody>>,
        trailers: Option<HeaderMap>,
    },
}

/// Reads a body to store it, up to `limit` bytes and within `deadline`.
async fn read_body(
    mut body: UpstreamResponseBody,
    limit: u64,
    deadline: Duration,
) -> Result<ReadBody, GatewayError> {
    if http_body::Body::size_hint(&body).lower() > limit {
        return Ok(ReadBody::Partial {
            head: Bytes::new(),
            rest: Some(Box::new(body)),
            trailers: None,
        });
    }
    // sized from Content-Length when known, so the stored bytes are what the store counts
    let expected = usize::try_from(http_body::Body::size_hint(&body).lower()).unwrap_or(0);
    let read = async {
        let mut buffer = BytesMut::with_capacity(expected);
        loop {
            let Some(frame) = body.frame().await else {
                return Ok(ReadBody::Complete(buffer.freeze()));
            };
            let frame = frame.map_err(|_| GatewayError::UpstreamProtocol)?;
            match frame.into_data() {
                Ok(data) => {
                    buffer.extend_from_slice(&data);
                    if buffer.len() as u64 > limit {
                        return Ok(ReadBody::Partial {
                            head: buffer.freeze(),
                            rest: Some(Box::new(body)),
                            trailers: None,
                        });
                    }
                }
                Err(frame) => {
                    return Ok(ReadBody::Partial {
                        head: buffer.freeze(),
                        rest: None,
                        trailers: frame.into_trailers().ok(),
                    })
                }
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| GatewayError::UpstreamTimeout)?
}

/// The client's response for what a fetch produced: a miss, unless a stored entry was confirmed
/// by a 304.
fn finish(fetched: Fetched, conditionals: &HeaderMap) -> (Response<ResponseBody>, CacheStatus) {
    match fetched {
        Fetched::Entry(entry, status) => (
            answer(&entry, conditionals, status, SystemTime::now()),
            status,
        ),
        Fetched::Passed(mut response) => {
            response
                .headers_mut()
                .insert(X_CACHE, CacheStatus::Miss.header());
            (*response, CacheStatus::Miss)
        }
    }
}

/// Headers a 304 carries from the entry (RFC 9110 §15.4.5).
const NOT_MODIFIED_HEADERS: [header::HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::VARY,
];

/// A response from a stored entry: a 304 when the client's conditional request is satisfied.
fn answer(
    entry: &Entry,
    conditionals: &HeaderMap,
    status: CacheStatus,
    now: SystemTime,
) -> Response<ResponseBody> {
    let initial_age = entry
        .headers
        .get(header::AGE)
        .and_then(|a| a.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let age = initial_age + entry.age(now).as_secs();
    let mut response =
        if entry.status == StatusCode::OK && entry.satisfies_conditional(conditionals) {
            let mut response = Response::new(ResponseBody::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            for name in NOT_MODIFIED_HEADERS {
                for value in entry.headers.get_all(&name) {
                    response.headers_mut().append(name.clone(), value.clone());
                }
            }
            response
        } else {
            let mut response = Response::new(ResponseBody::full(entry.body.clone()));
            *response.status_mut() = entry.status;
            *response.headers_mut() = entry.headers.clone();
            response
        };
    let headers = response.headers_mut();
    headers.insert(header::AGE, HeaderValue::from(age));
    headers.insert(X_CACHE, status.header());
    response
}
