//! Request composition: one client request answered by several upstream calls, run in parallel
//! (or after the calls whose JSON they use), merged into one JSON response.
//!
//! A composition is compiled with its route: call paths are parsed into [`template::Template`]s
//! and the calls sorted into waves (a wave's calls use only earlier waves' results). At request
//! time each wave runs concurrently, every call bounded by its timeout and the response-size
//! budget; a failure either fails the request or is marked in a partial answer.

pub mod template;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tokio::task::JoinSet;

use crate::{
    config::model::{ComposeConfig, ComposeFailure, ComposeMerge},
    pipeline::{GatewayError, UpstreamBody},
    route::PathPattern,
    upstream::Upstream,
};
use template::{Names, Template};

/// Calls one composition may make at most (its fan-out).
pub const MAX_CALLS: usize = 16;
/// The header naming the calls that failed in a partial answer.
pub const X_COMPOSE_PARTIAL: http::HeaderName = http::HeaderName::from_static("x-compose-partial");

/// A route's compiled composition.
#[derive(Debug)]
pub struct Composition {
    calls: Vec<Call>,
    waves: Vec<Vec<usize>>,
    merge: ComposeMerge,
    on_failure: ComposeFailure,
    max_response: u64,
    /// The route's path pattern, for its parameters.
    pattern: PathPattern,
    /// The client's credential headers: the gateway vouches for the caller with its identity
    /// headers, so the calls (often to other upstreams) never see the client's secrets.
    withheld: Vec<http::HeaderName>,
}

#[derive(Debug)]
struct Call {
    name: Arc<str>,
    upstream: Arc<Upstream>,
    method: Method,
    template: Template,
    timeout: Duration,
    dependencies: Vec<usize>,
}

/// A composed answer: the JSON body and the names of failed calls (partial answers only).
pub struct Composed {
    pub body: Bytes,
    pub failed: Option<HeaderValue>,
}

/// Why one call produced no JSON (shown under `_errors` in a partial answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallFailure {
    Timeout,
    Unavailable,
    Status(u16),
    InvalidJson,
    TooLarge,
    MissingValue,
    DependencyFailed,
}

impl CallFailure {
    fn describe(self) -> String {
        match self {
            Self::Timeout => "timeout".into(),
            Self::Unavailable => "unavailable".into(),
            Self::Status(status) => format!("status {status}"),
            Self::InvalidJson => "invalid JSON".into(),
            Self::TooLarge => "response too large".into(),
            Self::MissingValue => "a value its path needs is missing".into(),
            Self::DependencyFailed => "a call it depends on failed".into(),
        }
    }
}

impl Composition {
    /// Compiles `config` for a route with path pattern `route_path`. Errors name the field
    /// (relative to the route's `compose`) and what is wrong.
    pub fn compile(
        config: &ComposeConfig,
        route_path: &str,
        route_upstream: &Arc<Upstream>,
        upstreams: &HashMap<&str, Arc<Upstream>>,
        credential_headers: &[http::HeaderName],
    ) -> Result<Self, (String, String)> {
        let pattern = PathPattern::parse(route_path).map_err(|e| ("".to_owned(), e))?;
        if config.calls.is_empty() || config.calls.len() > MAX_CALLS {
            return Err((
                "calls".into(),
                format!("between 1 and {MAX_CALLS} calls (the fan-out limit)"),
            ));
        }
        let names: Vec<&str> = config.calls.iter().map(|c| c.name.as_str()).collect();
        let mut calls = Vec::with_capacity(config.calls.len());
        for (i, call) in config.calls.iter().enumerate() {
            let field = |name: &str| format!("calls[{i}].{name}");
            if call.name.is_empty() || call.name.starts_with('_') || call.name.contains('.') {
                return Err((
                    field("name"),
                    "must be non-empty, without `.`, and not start with `_`".into(),
                ));
            }
            if names[..i].contains(&call.name.as_str()) {
                return Err((field("name"), format!("`{}` is used twice", call.name)));
            }
            let upstream = match &call.upstream {
                None => route_upstream.clone(),
                Some(name) => upstreams
                    .get(name.as_str())
                    .cloned()
                    .ok_or_else(|| (field("upstream"), format!("no upstream named `{name}`")))?,
            };
            let method =
                Method::from_bytes(call.method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    (
                        field("method"),
                        format!("`{}` is not a method", call.method),
                    )
                })?;
            let template = Template::parse(
                &call.path,
                &Names {
                    params: &|name| pattern.has_param(name),
                    calls: &names,
                },
            )
            .map_err(|message| (field("path"), message))?;
            let mut dependencies: Vec<usize> = template.dependencies().collect();
            dependencies.sort_unstable();
            dependencies.dedup();
            if dependencies.contains(&i) {
                return Err((field("path"), "a call cannot use its own JSON".into()));
            }
            let timeout = call.timeout.map_or(upstream.total_timeout, |t| t.0);
            if timeout.is_zero() {
                return Err((field("timeout"), "must be greater than zero".into()));
            }
            calls.push(Call {
                name: call.name.as_str().into(),
                upstream,
                method,
                template,
                timeout,
                dependencies,
            });
        }
        let waves = waves(&calls).ok_or_else(|| {
            (
                "calls".to_owned(),
                "the calls use each other's JSON in a cycle".to_owned(),
            )
        })?;
        Ok(Self {
            calls,
            waves,
            merge: config.merge,
            on_failure: config.on_failure,
            max_response: config.max_response_size.0,
            pattern,
            withheld: credential_headers.to_vec(),
        })
    }

    /// Runs the calls for a request on `path` (normalised, as matched) by `subject`, sending
    /// `headers` (the forwarding and identity headers the gateway prepared) with each.
    pub async fn run(
        &self,
        path: &str,
        subject: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Composed, GatewayError> {
        let params = self.pattern.captures(path).unwrap_or_default();
        let headers = call_headers(headers, &self.withheld);
        let mut results: Vec<Option<Value>> = vec![None; self.calls.len()];
        let mut failures: Vec<Option<CallFailure>> = vec![None; self.calls.len()];
        // one budget for every call, also those running at the same time
        let budget = Arc::new(AtomicU64::new(self.max_response));
        for wave in &self.waves {
            let mut running = JoinSet::new();
            for &i in wave {
                let call = &self.calls[i];
                if call.dependencies.iter().any(|d| failures[*d].is_some()) {
                    failures[i] = Some(CallFailure::DependencyFailed);
                    continue;
                }
                let Ok(path) = call.template.fill(&params, subject, &results) else {
                    failures[i] = Some(CallFailure::MissingValue);
                    continue;
                };
                let mut request = Request::new(UpstreamBody::Empty);
                *request.method_mut() = call.method.clone();
                *request.headers_mut() = headers.clone();
                *request.uri_mut() = path.parse().map_err(|_| GatewayError::CompositionFailed)?;
                let upstream = call.upstream.clone();
                let timeout = call.timeout;
                let budget = budget.clone();
                running.spawn(async move {
                    let fetched =
                        tokio::time::timeout(timeout, fetch_json(&upstream, request, &budget))
                            .await
                            .unwrap_or(Err(CallFailure::Timeout));
                    (i, fetched)
                });
            }
            while let Some(joined) = running.join_next().await {
                let Ok((i, fetched)) = joined else {
                    return Err(GatewayError::CompositionFailed);
                };
                match fetched {
                    Ok(value) => results[i] = Some(value),
                    Err(CallFailure::TooLarge) => return Err(GatewayError::CompositionFailed),
                    Err(failure) => failures[i] = Some(failure),
                }
            }
            if self.on_failure == ComposeFailure::Fail && failures.iter().any(Option::is_some) {
                // the calls still running are aborted when `running` drops
                return Err(GatewayError::CompositionFailed);
            }
        }
        Ok(self.merge(results, &failures))
    }

    fn merge(&self, results: Vec<Option<Value>>, failures: &[Option<CallFailure>]) -> Composed {
        let mut merged = Map::new();
        for (call, result) in self.calls.iter().zip(results) {
            match (self.merge, result) {
                (ComposeMerge::Object, Some(Value::Object(fields))) => merged.extend(fields),
                (ComposeMerge::Object, None) => {}
                (_, result) => {
                    merged.insert(call.name.to_string(), result.unwrap_or(Value::Null));
                }
            }
        }
        let failed: Vec<&str> = self
            .calls
            .iter()
            .zip(failures)
            .filter(|(_, f)| f.is_some())
            .map(|(c, _)| &*c.name)
            .collect();
        if !failed.is_empty() {
            let errors: Map<String, Value> = self
                .calls
                .iter()
                .zip(failures)
                .filter_map(|(c, f)| {
                    Some((c.name.to_string(), Value::String(f.as_ref()?.describe())))
                })
                .collect();
            merged.insert("_errors".into(), Value::Object(errors));
        }
        Composed {
            body: Bytes::from(Value::Object(merged).to_string()),
            failed: (!failed.is_empty())
                .then(|| HeaderValue::from_str(&failed.join(", ")).ok())
                .flatten(),
        }
    }
}

/// Sorts calls into waves by their dependencies; `None` when they form a cycle.
fn waves(calls: &[Call]) -> Option<Vec<Vec<usize>>> {
    let mut wave_of: Vec<Option<usize>> = vec![None; calls.len()];
    let mut waves: Vec<Vec<usize>> = Vec::new();
    let mut placed = 0;
    while placed < calls.len() {
        let ready: Vec<usize> = (0..calls.len())
            .filter(|&i| wave_of[i].is_none())
            .filter(|&i| {
                calls[i]
                    .dependencies
                    .iter()
                    .all(|d| wave_of[*d].is_some_and(|w| w < waves.len()))
            })
            .collect();
        if ready.is_empty() {
            return None;
        }
        for &i in &ready {
            wave_of[i] = Some(waves.len());
        }
        placed += ready.len();
        waves.push(ready);
    }
    Some(waves)
}

/// The headers every call carries: the client request's forwarding and identity headers, minus
/// its credentials (`withheld`) and what describes the client's own body, connection, upgrade or
/// encoding.
fn call_headers(client: &HeaderMap, withheld: &[http::HeaderName]) -> HeaderMap {
    let mut headers = client.clone();
    for name in withheld {
        headers.remove(name);
    }
    let websocket: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("sec-websocket-"))
        .cloned()
        .collect();
    for name in websocket {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::UPGRADE,
        header::HOST,
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::TRANSFER_ENCODING,
        header::ACCEPT_ENCODING,
        header::EXPECT,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers
}

/// One call: a 2xx response whose body is JSON, its bytes taken from the shared `budget`.
async fn fetch_json(
    upstream: &Upstream,
    request: Request<UpstreamBody>,
    budget: &AtomicU64,
) -> Result<Value, CallFailure> {
    let forwarded = upstream
        .forward(request, None, true)
        .await
        .map_err(|failure| match failure.error {
            GatewayError::UpstreamTimeout => CallFailure::Timeout,
            _ => CallFailure::Unavailable,
        })?;
    let (parts, body) = forwarded.response.into_parts();
    if !parts.status.is_success() {
        return Err(CallFailure::Status(parts.status.as_u16()));
    }
    let mut body = body;
    let mut bytes = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| CallFailure::Unavailable)?;
        if let Ok(data) = frame.into_data() {
            let size = data.len() as u64;
            budget
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    left.checked_sub(size)
                })
                .map_err(|_| CallFailure::TooLarge)?;
            bytes.extend_from_slice(&data);
        }
    }
    let body = bytes.freeze();
    serde_json::from_slice(&body).map_err(|_| CallFailure::InvalidJson)
}
