//! Compiling a loaded config into the immutable [`Snapshot`] the request path reads.
//!
//! Everything a request needs is decided here, once per (re)load: patterns parsed, routes sorted by
//! precedence, upstream names resolved to `Arc`s, TLS material loaded, durations converted. A
//! request loads the current snapshot once and keeps it, so in-flight requests finish on the config
//! they started with. `portcullis validate` runs this same compile without binding anything.

use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;

use crate::{
    compression::CompressionPolicy,
    config::{
        model::{HashOn, ListenerConfig, LoadBalancing, RouteConfig, StoreKind, UpstreamConfig},
        ConfigErrors, ErrorSink, LoadedConfig,
    },
    policy::{
        authn::{
            ApiKeySet, AuthMethod, Authenticator, IdentityHeaderNames, IntrospectionProvider,
            JwtError, JwtProvider, MtlsMethod, RevocationList, SharedRevocations,
        },
        authz::{self, Policy},
        ratelimit::{InFlightLimit, RateLimits},
        Access, RoutePolicies,
    },
    route::{HostPattern, PathPattern, RouteMatch, RouteTable},
    store::RedisStore,
    tls,
    upstream::{
        Balancer, ClientSettings, HashKey, Target, TargetScheme, Upstream, UpstreamRegistry,
    },
};

/// The compiled, immutable config.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    /// JWT providers (their remote key sets are refreshed in the background).
    pub jwt_providers: Vec<Arc<JwtProvider>>,
    /// Revocations kept in Redis (`authentication.revocations.store: redis`).
    pub shared_revocations: Option<Arc<SharedRevocations>>,
    pub listeners: Vec<Arc<ListenerSpec>>,
    pub routes: RouteTable<Arc<Route>>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub trusted_proxies: Vec<IpNet>,
    /// Metrics, access log, alert rules as this config wants them.
    pub observer: Arc<crate::telemetry::Observer>,
    pub shutdown_timeout: Duration,
    pub admin_bind: Option<SocketAddr>,
    /// The admin API's bearer token.
    pub admin_token: Option<Box<str>>,
    pub workers: Option<usize>,
    pub watch_config: bool,
    /// The effective config as JSON, secrets redacted (served on the admin `/config`).
    pub effective_config: serde_json::Value,
    /// Findings of the compile step that do not stop the config (e.g. a route no role can
    /// reach), for `portcullis validate` and the log at (re)load.
    pub warnings: Vec<crate::config::ConfigWarning>,
    /// Rate limits kept in Redis (`fast` mode's background sync runs with the snapshot).
    pub rate_limit_shared: Option<crate::policy::ratelimit::SharedMode>,
    /// The in-process rate-limit buckets (for the admin API's counts).
    pub rate_limit_buckets: Arc<crate::policy::ratelimit::LocalBuckets>,
    /// Open connections one client address may have.
    pub max_connections_per_ip: Option<usize>,
    pub connection_counts: Arc<crate::policy::ratelimit::ConnectionCounts>,
    /// Adaptive limits: scored after every request, listed on the admin API.
    pub adaptive: Option<Arc<crate::policy::ratelimit::Adaptive>>,
    /// The response cache's store (purged through the admin API).
    pub cache_store: crate::cache::Store,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerSpec>> {
        self.listeners.iter().find(|l| &*l.name == name)
    }

    /// JWT providers whose remote key set has not been fetched once yet: until it has, they
    /// refuse every token, so the gateway does not call itself ready.
    pub fn providers_without_keys(&self) -> impl Iterator<Item = &str> {
        self.jwt_providers
            .iter()
            .filter(|p| p.remote().is_some_and(|remote| !remote.has_been_fetched()))
            .map(|p| &*p.name)
    }
}

/// A listener as the connection loop needs it.
#[derive(Debug)]
pub struct ListenerSpec {
    pub name: Arc<str>,
    /// Position in the snapshot's listener list (the bit in a route's listener mask).
    pub index: usize,
    pub bind: SocketAddr,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub http2: bool,
    /// HTTP/3 on the same address (UDP), when enabled.
    pub http3: Option<super::http3::Http3Spec>,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body: u64,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Response compression for routes without their own (`compression`).
    pub compression: Option<CompressionPolicy>,
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub upstream: Arc<Upstream>,
    pub policies: RoutePolicies,
    pub strip_prefix: Option<Box<str>>,
    pub add_prefix: Option<Box<str>>,
    pub host: HostRewrite,
    /// `None`: the listener's limit.
    pub max_body: Option<u64>,
    /// The route's cap on requests in flight.
    pub max_in_flight: Option<crate::policy::ratelimit::InFlightLimit>,
    /// The upstream's cap on requests in flight (shared by every route to it).
    pub upstream_max_in_flight: Option<crate::policy::ratelimit::InFlightLimit>,
    /// The route's metric handles and live tallies.
    pub observer: Arc<crate::telemetry::RouteObserver>,
    /// Bodies captured for the access log (`capture_payload`).
    pub capture: Option<Arc<crate::telemetry::payload::CapturePolicy>>,
    /// Response caching (`cache`).
    pub cache: Option<Arc<crate::cache::RouteCache>>,
    /// Request composition (`compose`): answered by several upstream calls.
    pub compose: Option<Arc<crate::compose::Composition>>,
    /// Translate gRPC-Web requests to gRPC (`grpc_web`).
    pub grpc_web: bool,
    /// WebSocket upgrades allowed, and how tunnels are kept (`websocket`). `None`: upgrade
    /// headers are stripped and no tunnel opens.
    pub websocket: Option<super::upgrade::WebSocketSettings>,
    /// Response compression (`compression`); `None`: the listener's.
    pub compression: Option<CompressionPolicy>,
}

/// The `Host` header sent upstream.
#[derive(Debug, Clone)]
pub enum HostRewrite {
    Keep,
    Target,
    Value(HeaderValue),
}

/// Compiles `loaded`. Long-lived state (target health, pools) comes from `registry`.
pub fn compile(
    loaded: &LoadedConfig,
    registry: &UpstreamRegistry,
    generation: u64,
) -> Result<Snapshot, ConfigErrors> {
    let mut sink = ErrorSink::new(loaded);
    let config = &loaded.config;

    let listeners: Vec<Arc<ListenerSpec>> = config
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| compile_listener(i, l, &loaded.base_dir, &mut sink).map(Arc::new))
        .collect();

    let upstreams: HashMap<&str, Arc<Upstream>> = config
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            compile_upstream(i, u, &loaded.base_dir, registry, &mut sink)
                .map(|up| (u.name.as_str(), Arc::new(up)))
        })
        .collect();

    let listener_index: HashMap<&str, usize> = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.as_str(), i))
        .collect();
    let authentication = compile_authentication(loaded, registry, &mut sink);
    let policy = Arc::new(Policy::compile(&config.authorization, &mut sink));
    let rate_limits = RateLimits::compile(
        &config.rate_limits,
        authentication.shared_store.as_ref(),
        &registry.rate_limit_buckets,
        &registry.adaptive_scores,
        &mut sink,
    );
    let mut compiled_routes = Vec::new();
    for (i, upstream) in config.upstreams.iter().enumerate() {
        if upstream.max_in_flight == Some(0) {
            sink.error(
                format!("upstreams[{i}].max_in_flight"),
                "must be more than 0 (0 would refuse every request)",
            );
        }
    }
    let observer = compile_observability(config, &rate_limits, registry, &mut sink);
    let cache_store = compile_cache_store(
        &config.cache,
        authentication.shared_store.as_ref(),
        registry,
        &mut sink,
    );
    let cache_credentials = Arc::new(crate::cache::Credentials::new(
        &crate::config::credential_headers(&config.authentication),
        crate::config::credential_query_params(&config.authentication),
    ));
    let context = RouteContext {
        cache_store: &cache_store,
        cache_credentials: &cache_credentials,
        cache_max_entry: config.cache.max_entry_size.0,
        observer: &observer,
        upstreams: &upstreams,
        listener_index: &listener_index,
        authentication: &authentication,
        policy: &policy,
        rate_limits: &rate_limits,
        registry,
        upstream_limits: config
            .upstreams
            .iter()
            .filter_map(|u| {
                let max = u.max_in_flight.filter(|max| *max > 0)?;
                let counter = registry.in_flight.counter(format!("upstream:{}", u.name));
                Some((u.name.as_str(), InFlightLimit::new(max, counter)))
            })
            .collect(),
    };
    for (i, route) in config.routes.iter().enumerate() {
        if let Some(compiled) = compile_route(i, route, &context, &mut sink) {
            compiled_routes.push(compiled);
        }
    }
    let trusted_proxies = config
        .server
        .trusted_proxies
        .iter()
        .filter_map(|cidr| crate::config::parse_cidr(cidr))
        .collect();

    if sink.has_errors() {
        return Err(sink.into_errors());
    }
    authz::lint(config, &policy, &mut sink);
    registry
        .rate_limit_buckets
        .set_max_keys(config.rate_limits.max_keys);
    let warnings = std::mem::take(&mut sink.warnings);
    let mut upstream_list: Vec<Arc<Upstream>> = upstreams.into_values().collect();
    upstream_list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Snapshot {
        generation,
        jwt_providers: authentication.jwt_providers(),
        shared_revocations: authentication.shared_revocations.clone(),
        listeners,
        routes: RouteTable::new(compiled_routes),
        upstreams: upstream_list,
        trusted_proxies,
        observer,
        shutdown_timeout: config.server.shutdown_timeout.0,
        admin_token: config
            .admin
            .token
            .clone()
            .or_else(|| std::env::var("PORTCULLIS_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty())
            .map(Into::into),
        admin_bind: config
            .admin
            .enabled
            .then(|| config.admin.bind.parse().ok())
            .flatten(),
        workers: config.server.workers,
        watch_config: config.server.watch_config,
        effective_config: crate::config::redacted_json(loaded),
        warnings,
        rate_limit_shared: rate_limits.shared.clone(),
        rate_limit_buckets: registry.rate_limit_buckets.clone(),
        max_connections_per_ip: config.rate_limits.max_connections_per_ip,
        connection_counts: registry.connection_counts.clone(),
        adaptive: rate_limits.adaptive.clone(),
        cache_store,
    })
}

/// The `observability` section against the gateway's telemetry.
fn compile_observability(
    config: &crate::config::Config,
    rate_limits: &RateLimits,
    registry: &UpstreamRegistry,
    sink: &mut ErrorSink<'_>,
) -> Arc<crate::telemetry::Observer> {
    use crate::telemetry::{access_log::AccessLogPolicy, alerts::Webhook};
    let section = &config.observability;
    let credential_headers = crate::config::credential_headers(&config.authentication);
    let token_params = crate::config::credential_query_params(&config.authentication);
    let mut access_log_config = section.access_log.clone();
    if let Some(enabled) = config.server.access_log {
        sink.warn(
            "server.access_log",
            "deprecated: use `observability.access_log.enabled` (this setting wins while it is here)",
        );
        access_log_config.enabled = enabled;
    }
    let access_log =
        AccessLogPolicy::compile(&access_log_config, &credential_headers, &token_params)
            .unwrap_or_else(|error| {
                sink.error("observability.access_log", error);
                AccessLogPolicy::disabled()
            });
    if !(0.0..=1.0).contains(&section.access_log.sample_success) {
        sink.error(
            "observability.access_log.sample_success",
            "must be between 0 and 1",
        );
    }
    let webhooks = section
        .alerts
        .webhooks
        .iter()
        .enumerate()
        .filter_map(|(i, webhook)| {
            Webhook::compile(webhook)
                .map_err(|error| {
                    sink.error(format!("observability.alerts.webhooks[{i}].url"), error)
                })
                .ok()
                .map(Arc::new)
        })
        .collect();
    let history = section.sampling.history.0;
    let mut names = std::collections::HashSet::new();
    for (i, rule) in section.alerts.rules.iter().enumerate() {
        let at = format!("observability.alerts.rules[{i}]");
        if !names.insert(rule.name.as_str()) {
            sink.error(
                format!("{at}.name"),
                format!("`{}` is used twice", rule.name),
            );
        }
        if rule.name.starts_with("anomaly") {
            sink.error(
                format!("{at}.name"),
                "names starting with `anomaly` are reserved",
            );
        }
        if rule.above.is_none() && rule.rise_over_baseline.is_none() {
            sink.error(at.clone(), "needs `above`, `rise_over_baseline` or both");
        }
        use crate::config::model::AlertSignal;
        let gauge = matches!(
            rule.signal,
            AlertSignal::InFlight | AlertSignal::Connections | AlertSignal::LogQueueFill
        );
        if gauge && rule.rise_over_baseline.is_some() {
            sink.error(
                format!("{at}.rise_over_baseline"),
                "gauge signals (in_flight, connections, log_queue_fill) are judged by `above` only",
            );
        }
        if gauge && rule.route.is_some() {
            sink.error(
                format!("{at}.route"),
                "gauge signals (in_flight, connections, log_queue_fill) are gateway-wide",
            );
        }
        if let Some(route) = &rule.route {
            if !config.routes.iter().any(|r| &r.name == route) {
                sink.error(
                    format!("{at}.route"),
                    format!("no route is named `{route}`"),
                );
            }
        }
        let needed = rule.window.0
            + if rule.rise_over_baseline.is_some() {
                rule.baseline.0
            } else {
                std::time::Duration::ZERO
            };
        if needed > history {
            sink.error(
                format!("{at}.window"),
                format!(
                    "the window (and baseline) span {}s, more than the {}s of history kept \
                     (`observability.sampling.history`)",
                    needed.as_secs(),
                    history.as_secs()
                ),
            );
        }
    }
    if let Some(anomaly) = &section.anomaly {
        if anomaly.events.is_empty() {
            sink.error("observability.anomaly.events", "names no event to count");
        }
        if let Some(adaptive) = config.rate_limits.adaptive.as_ref() {
            let (v4, v6) = (adaptive.network.ipv4, adaptive.network.ipv6);
            if anomaly.adaptive_points > 0.0
                && (anomaly.ipv4_prefix, anomaly.ipv6_prefix) != (v4, v6)
            {
                sink.warn(
                    "observability.anomaly",
                    format!(
                        "networks are grouped by /{}, /{} here but by /{v4}, /{v6} in \
                         rate_limits.adaptive.network: the score of the adaptive network holding \
                         an anomalous one is raised",
                        anomaly.ipv4_prefix, anomaly.ipv6_prefix
                    ),
                );
            }
        }
        if anomaly.ipv4_prefix > 32 || anomaly.ipv6_prefix > 128 {
            sink.error(
                "observability.anomaly",
                "prefix lengths are at most 32 (IPv4) and 128 (IPv6)",
            );
        }
        if anomaly.window.0 > history {
            sink.error(
                "observability.anomaly.window",
                "longer than the history kept (`observability.sampling.history`)",
            );
        }
    }
    Arc::new(crate::telemetry::Observer::new(
        registry.telemetry.clone(),
        section,
        access_log,
        webhooks,
        rate_limits.adaptive.clone(),
        config.routes.iter().map(|r| r.name.clone()).collect(),
    ))
}

fn compile_listener(
    i: usize,
    listener: &ListenerConfig,
    base: &Path,
    sink: &mut ErrorSink<'_>,
) -> Option<ListenerSpec> {
    let path = format!("listeners[{i}]");
    let bind: SocketAddr = listener.bind.parse().ok()?;
    let tls = match &listener.tls {
        None => None,
        Some(tls_config) => {
            let mut keys = Vec::new();
            for (c, cert) in tls_config.certificates.iter().enumerate() {
                match tls::certified_key(&base.join(&cert.cert), &base.join(&cert.key)) {
                    Ok(key) => keys.push((cert, key)),
                    Err(error) => {
                        sink.error(format!("{path}.tls.certificates[{c}]"), error.to_string())
                    }
                }
            }
            let (_, default) = keys.first()?.clone();
            let by_name = keys
                .iter()
                .flat_map(|(cert, key)| {
                    cert.server_names
                        .iter()
                        .filter_map(|name| HostPattern::parse(name).ok())
                        .map(|pattern| (pattern, key.clone()))
                })
                .collect();
            let resolver = Arc::new(tls::SniResolver::new(default, by_name));
            let tls13_only = tls_config.min_version == crate::config::model::TlsVersion::Tls13;
            let client_ca = tls_config
                .client_auth
                .as_ref()
                .map(|c| (base.join(&c.ca), c.required));
            let client_certs = client_ca
                .as_ref()
                .map(|(ca, required)| tls::ClientCertPolicy {
                    ca,
                    required: *required,
                });
            match tls::server_config(resolver, tls13_only, listener.http2, client_certs) {
                Ok(server) => Some(Arc::new(server)),
                Err(error) => {
                    sink.error(format!("{path}.tls"), error.to_string());
                    None
                }
            }
        }
    };
    let limits = &listener.limits;
    let http3 = match (listener.http3(), &tls) {
        (Some(http3), Some(tls)) => {
            match super::http3::Http3Spec::new(&http3, tls, limits.idle_timeout.0) {
                Ok(spec) => Some(spec),
                Err(error) => {
                    sink.error(format!("{path}.http3"), error.to_string());
                    None
                }
            }
        }
        // without TLS: reported by validation
        _ => None,
    };
    Some(ListenerSpec {
        name: listener.name.as_str().into(),
        index: i,
        bind,
        tls,
        http2: listener.http2,
        http3,
        max_header_bytes: limits.max_header_bytes.0 as usize,
        max_headers: limits.max_headers,
        max_body: limits.max_body.0,
        header_timeout: limits.header_timeout.0,
        idle_timeout: limits.idle_timeout.0,
        max_connections: limits.max_connections,
        compression: listener
            .compression
            .as_ref()
            .map(|c| CompressionPolicy::compile(c, &format!("{path}.compression"), sink)),
    })
}

fn compile_upstream(
    i: usize,
    upstream: &UpstreamConfig,
    base: &Path,
    registry: &UpstreamRegistry,
    sink: &mut ErrorSink<'_>,
) -> Option<Upstream> {
    let path = format!("upstreams[{i}]");
    let mut scheme = TargetScheme::Http1;
    let mut targets = Vec::new();
    for target in &upstream.targets {
        let (scheme_text, authority) = crate::config::parse_target_url(&target.url).ok()?;
        scheme = TargetScheme::from_config(scheme_text);
        targets.push(Target {
            label: target.url.as_str().into(),
            authority: authority.parse().ok()?,
            weight: target.weight,
            state: registry.target_state(&upstream.name, &target.url),
        });
    }
    if targets.is_empty() {
        return None;
    }
    let tls_settings = upstream.tls.clone().unwrap_or_default();
    let client_pair = tls_settings
        .client_cert
        .as_ref()
        .zip(tls_settings.client_key.as_ref())
        .map(|(c, k)| (base.join(c), base.join(k)));
    let ca = tls_settings.ca.as_ref().map(|ca| base.join(ca));
    let tls_config = match tls::client_config(
        ca.as_deref(),
        client_pair
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    ) {
        Ok(config) => Arc::new(config),
        Err(error) => {
            sink.error(format!("{path}.tls"), error.to_string());
            return None;
        }
    };
    let settings = ClientSettings {
        scheme,
        tls: tls_config,
        tls_fingerprint: tls_fingerprint(ca.as_deref(), client_pair.as_ref()),
        server_name: tls_settings.server_name.clone(),
        connect_timeout: upstream.timeouts.connect.0,
        max_idle: upstream.max_idle_connections,
        idle_timeout: upstream.idle_timeout.0,
    };
    let (balancer, hash_on) = match &upstream.load_balancing {
        LoadBalancing::RoundRobin {} => (Balancer::round_robin(&targets), None),
        LoadBalancing::LeastRequest {} => (Balancer::LeastRequest, None),
        LoadBalancing::ConsistentHash { hash_on } => {
            let key = match hash_on {
                HashOn::Header(name) => {
                    HashKey::Header(HeaderName::from_bytes(name.as_bytes()).ok()?)
                }
                HashOn::Cookie(name) => HashKey::Cookie(name.as_str().into()),
                HashOn::ClientIp => HashKey::ClientIp,
            };
            (Balancer::consistent_hash(&targets), Some(key))
        }
    };
    Some(Upstream {
        name: upstream.name.as_str().into(),
        scheme,
        balancer,
        hash_on,
        targets: targets.into(),
        connect_timeout: upstream.timeouts.connect.0,
        per_try_timeout: upstream.timeouts.per_try.0,
        total_timeout: upstream.timeouts.total.0,
        max_retries: upstream.retries.max_retries,
        budget: registry.retry_budget(
            &upstream.name,
            upstream.retries.budget_percent,
            upstream.retries.min_retries_per_second,
        ),
        outlier: upstream.outlier_detection.clone(),
        health_check: upstream.health_check.clone(),
        pool: registry.pool(&upstream.name, settings),
        epoch: registry.epoch(),
    })
}

/// What every route's compile reads: the compiled sections routes refer to.
struct RouteContext<'a> {
    upstreams: &'a HashMap<&'a str, Arc<Upstream>>,
    listener_index: &'a HashMap<&'a str, usize>,
    authentication: &'a Authentication,
    policy: &'a Arc<Policy>,
    rate_limits: &'a RateLimits,
    registry: &'a UpstreamRegistry,
    /// Upstreams' caps on requests in flight, by name.
    upstream_limits: HashMap<&'a str, InFlightLimit>,
    observer: &'a crate::telemetry::Observer,
    /// Where routes with a `cache` section keep their responses.
    cache_store: &'a crate::cache::Store,
    cache_credentials: &'a Arc<crate::cache::Credentials>,
    cache_max_entry: u64,
}

/// The response cache's store as the `cache` section wants it. The in-memory one lives in the
/// registry (a reload keeps it, resized); a Redis one shares the `redis` section's connection.
fn compile_cache_store(
    config: &crate::config::model::CacheConfig,
    redis: Option<&Arc<RedisStore>>,
    registry: &UpstreamRegistry,
    sink: &mut ErrorSink<'_>,
) -> crate::cache::Store {
    // an entry also holds its headers: a body near a shard's whole budget would be refused
    if config.max_entry_size.0 > config.max_size.0 / 32 {
        sink.error(
            "cache.max_entry_size",
            format!(
                "must be at most 1/32 of `max_size` ({} bytes): the store is split in 16 shards",
                config.max_size.0 / 32
            ),
        );
    }
    match (config.store, redis) {
        (StoreKind::Redis, Some(redis)) => crate::cache::Store::Redis(Arc::new(
            crate::cache::redis::RedisStore::new(redis.clone()),
        )),
        (StoreKind::Redis, None) => {
            sink.error(
                "cache.store",
                "`store: redis` needs the top-level `redis` section",
            );
            crate::cache::Store::Memory(registry.responses.clone())
        }
        (StoreKind::Memory, _) => {
            registry.responses.set_max_bytes(config.max_size.0);
            crate::cache::Store::Memory(registry.responses.clone())
        }
    }
}

fn compile_route(
    i: usize,
    route: &RouteConfig,
    context: &RouteContext<'_>,
    sink: &mut ErrorSink<'_>,
) -> Option<(RouteMatch, Arc<Route>)> {
    let RouteContext {
        upstreams,
        listener_index,
        authentication,
        policy,
        rate_limits,
        registry,
        upstream_limits,
        observer,
        cache_store,
        cache_credentials,
        cache_max_entry,
    } = context;
    let path = format!("routes[{i}]");
    let upstream = upstreams.get(route.upstream.as_str())?.clone();
    let compiled_upstream = upstream.clone();
    let matcher = &route.matcher;
    let hosts = matcher
        .hosts
        .iter()
        .filter_map(|h| HostPattern::parse(h).ok())
        .collect();
    let path_pattern = PathPattern::parse(&matcher.path).ok()?;
    let methods = matcher
        .methods
        .iter()
        .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
        .collect();
    let headers = matcher
        .headers
        .iter()
        .filter_map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            let value = match &h.value {
                Some(v) => Some(HeaderValue::from_str(v).ok()?),
                None => None,
            };
            Some((name, value))
        })
        .collect();
    let listeners = if route.listeners.is_empty() {
        u64::MAX
    } else {
        route
            .listeners
            .iter()
            .filter_map(|name| listener_index.get(name.as_str()))
            .fold(0u64, |mask, &i| mask | (1 << i))
    };
    let rewrite = route.rewrite.clone().unwrap_or_default();
    let host = match &rewrite.host {
        None if rewrite.host_from_target => HostRewrite::Target,
        None => HostRewrite::Keep,
        Some(value) => match HeaderValue::from_str(value) {
            Ok(value) => HostRewrite::Value(value),
            Err(_) => {
                sink.error(format!("{path}.rewrite.host"), "not a valid header value");
                return None;
            }
        },
    };
    if route.max_in_flight == Some(0) {
        sink.error(
            format!("{path}.max_in_flight"),
            "must be more than 0 (0 would refuse every request)",
        );
    }
    let websocket = super::upgrade::WebSocketSettings::compile(route, upstream.scheme, &path, sink);
    let authorization = if route.public {
        if route.authorization.is_some() {
            sink.error(
                format!("{path}.authorization"),
                "a public route has no identity to authorize: remove `authorization` or `public`",
            );
            return None;
        }
        None
    } else {
        Some(Arc::new(policy.route(i, route, sink)?))
    };
    let access = if route.public {
        Access::Public
    } else {
        let methods: Vec<AuthMethod> = route
            .auth
            .iter()
            .filter_map(|name| {
                authentication
                    .methods
                    .get(name.as_str())
                    .map(AuthMethod::share)
            })
            .collect();
        if methods.is_empty() {
            // validation has reported why; nothing to compile
            return None;
        }
        Access::Authenticated(Arc::new(Authenticator {
            methods,
            revocations: authentication.revocations.clone(),
        }))
    };
    let compiled = Route {
        name: route.name.as_str().into(),
        upstream,
        policies: RoutePolicies {
            identity_headers: authentication.identity_headers.clone(),
            access,
            authorization,
            adaptive: rate_limits.adaptive.clone(),
            rate_limits: rate_limits.route(
                i,
                &route.rate_limits,
                &registry.rate_limit_buckets,
                sink,
            ),
        },
        strip_prefix: rewrite.strip_prefix.map(Into::into),
        add_prefix: rewrite.add_prefix.map(Into::into),
        host,
        max_body: route.max_body.map(|b| b.0),
        max_in_flight: route.max_in_flight.map(|max| {
            InFlightLimit::new(
                max,
                registry.in_flight.counter(format!("route:{}", route.name)),
            )
        }),
        upstream_max_in_flight: upstream_limits.get(route.upstream.as_str()).cloned(),
        observer: observer.route(&route.name),
        capture: route
            .capture_payload
            .as_ref()
            .map(|config| Arc::new(crate::telemetry::payload::CapturePolicy::compile(config))),
        cache: route.cache.as_ref().map(|config| {
            Arc::new(crate::cache::RouteCache {
                freshness: crate::cache::Freshness {
                    default_ttl: config.ttl.map(|t| t.0),
                    override_ttl: config.override_ttl,
                    stale_while_revalidate: config
                        .stale_while_revalidate
                        .map(|t| t.0)
                        .unwrap_or_default(),
                },
                shared: config.shared,
                max_entry_bytes: *cache_max_entry,
                store: (*cache_store).clone(),
                coalescer: registry.cache_fetches.clone(),
                credentials: (*cache_credentials).clone(),
                outcomes: registry.telemetry.metrics.cache_outcomes(&route.name),
            })
        }),
        compose: None,
        grpc_web: route.grpc_web,
        websocket,
        compression: route
            .compression
            .as_ref()
            .map(|c| CompressionPolicy::compile(c, &format!("{path}.compression"), sink)),
    };
    if route.grpc_web && compiled.upstream.scheme == crate::upstream::TargetScheme::Http1 {
        sink.error(
            format!("{path}.grpc_web"),
            format!(
                "gRPC needs HTTP/2: upstream `{}` must use `h2c://` or `https://` targets",
                route.upstream
            ),
        );
    }
    if route
        .cache
        .as_ref()
        .is_some_and(|c| c.override_ttl && c.ttl.is_none())
    {
        sink.error(format!("{path}.cache.override_ttl"), "needs `ttl`");
    }
    let compose = match &route.compose {
        None => None,
        Some(_) if route.websocket => {
            sink.error(
                format!("{path}.compose"),
                "a composed route cannot also accept `websocket` upgrades",
            );
            return None;
        }
        Some(_) if route.cache.is_some() => {
            sink.error(
                format!("{path}.compose"),
                "a composed route cannot also have `cache` (cache the calls' own routes instead)",
            );
            return None;
        }
        Some(config) => match crate::compose::Composition::compile(
            config,
            &matcher.path,
            &compiled_upstream,
            upstreams,
            cache_credentials.header_names(),
        ) {
            Ok(composition) => Some(Arc::new(composition)),
            Err((field, message)) => {
                let field = if field.is_empty() {
                    format!("{path}.compose")
                } else {
                    format!("{path}.compose.{field}")
                };
                sink.error(field, message);
                return None;
            }
        },
    };
    let compiled = Route {
        compose,
        ..compiled
    };
    Some((
        RouteMatch {
            hosts,
            path: path_pattern,
            methods,
            headers,
            listeners,
        },
        Arc::new(compiled),
    ))
}

/// Identifies upstream TLS material by path *and content*, so a certificate renewed in place gets
/// new connections on the next reload while unchanged settings keep their pooled connections.
fn tls_fingerprint(
    ca: Option<&Path>,
    client: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let files = ca.into_iter().chain(
        client
            .into_iter()
            .flat_map(|(c, k)| [c.as_path(), k.as_path()]),
    );
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(file).unwrap_or_default().hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}

/// The compiled `authentication` section.
struct Authentication {
    identity_headers: Arc<IdentityHeaderNames>,
    /// The `redis` section's store (one per config generation), shared with rate limits.
    shared_store: Option<Arc<RedisStore>>,
    revocations: Arc<RevocationList>,
    shared_revocations: Option<Arc<SharedRevocations>>,
    methods: HashMap<String, AuthMethod>,
}

impl Authentication {
    fn jwt_providers(&self) -> Vec<Arc<JwtProvider>> {
        let mut providers: Vec<Arc<JwtProvider>> = self
            .methods
            .values()
            .filter_map(|m| match m {
                AuthMethod::Jwt(provider) => Some(provider.clone()),
                AuthMethod::ApiKey(_) | AuthMethod::Introspection(_) | AuthMethod::Mtls(_) => None,
            })
            .collect();
        providers.sort_by(|a, b| a.name.cmp(&b.name));
        providers
    }
}

fn compile_authentication(
    loaded: &LoadedConfig,
    registry: &UpstreamRegistry,
    sink: &mut ErrorSink<'_>,
) -> Authentication {
    let section = &loaded.config.authentication;
    let names = &section.identity_headers;
    let header = |field: &str, value: &str, sink: &mut ErrorSink<'_>| {
        HeaderName::from_bytes(value.as_bytes()).unwrap_or_else(|_| {
            sink.error(
                format!("authentication.identity_headers.{field}"),
                format!("`{value}` is not a valid header name"),
            );
            HeaderName::from_static("x-invalid")
        })
    };
    let subject = header("subject", &names.subject, sink);
    let issuer = header("issuer", &names.issuer, sink);
    let method = header("method", &names.method, sink);
    let provider = header("provider", &names.provider, sink);
    let roles = header("roles", &names.roles, sink);
    let mut all = vec![
        subject.clone(),
        issuer.clone(),
        method.clone(),
        provider.clone(),
        roles.clone(),
    ];
    for jwt in &section.jwt {
        all.extend(
            jwt.claim_headers
                .values()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        );
    }
    all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    all.dedup();
    let identity_headers = Arc::new(IdentityHeaderNames {
        subject,
        issuer,
        method,
        provider,
        roles,
        all,
        policy_claims: {
            let mut claims: Vec<Box<str>> = authz::claims_read(&loaded.config.authorization).into();
            claims.extend(
                crate::policy::ratelimit::claims_read(&loaded.config.rate_limits).map(Into::into),
            );
            claims.sort_unstable();
            claims.dedup();
            claims.into()
        },
    });
    let shared_store = loaded.config.redis.as_ref().and_then(|redis| {
        RedisStore::from_config(redis)
            .map(Arc::new)
            .map_err(|message| sink.error("redis.url", message))
            .ok()
    });
    let revocations = &section.revocations;
    let shared_revocations = match (revocations.store, &shared_store) {
        (StoreKind::Memory, _) => None,
        (StoreKind::Redis, Some(store)) => Some(Arc::new(SharedRevocations::new(
            store.clone(),
            revocations
                .sync_interval
                .0
                .max(std::time::Duration::from_millis(100)),
        ))),
        (StoreKind::Redis, None) => {
            sink.error(
                "authentication.revocations.store",
                "`store: redis` needs the top-level `redis` section",
            );
            None
        }
    };
    let mut methods = HashMap::new();
    for (i, jwt) in section.jwt.iter().enumerate() {
        match JwtProvider::from_config(
            jwt,
            &loaded.base_dir,
            identity_headers.clone(),
            &registry.jwks,
            shared_store.as_ref(),
        ) {
            Ok(provider) => {
                methods.insert(jwt.name.clone(), AuthMethod::Jwt(Arc::new(provider)));
            }
            Err(error) => {
                let field = match &error {
                    JwtError::UnknownAlgorithm(_) | JwtError::SecretMismatch => "algorithms",
                    JwtError::BadHeader(_) => "claim_headers",
                    JwtError::ShortSecret | JwtError::Keys(_) | JwtError::BadUrl(_) => "keys",
                    JwtError::DecryptionKey(_) => "decryption_keys",
                    JwtError::NoSharedStore => "replay_store",
                };
                sink.error(
                    format!("authentication.jwt[{i}].{field}"),
                    error.to_string(),
                )
            }
        }
    }
    for method in &section.mtls {
        let compiled = MtlsMethod::from_config(method, identity_headers.clone());
        methods.insert(method.name.clone(), AuthMethod::Mtls(Arc::new(compiled)));
    }
    for (i, provider) in section.introspection.iter().enumerate() {
        match IntrospectionProvider::from_config(provider, identity_headers.clone()) {
            Ok(compiled) => {
                methods.insert(
                    provider.name.clone(),
                    AuthMethod::Introspection(Arc::new(compiled)),
                );
            }
            Err(message) => sink.error(
                format!("authentication.introspection[{i}].endpoint"),
                message,
            ),
        }
    }
    for (i, set) in section.api_keys.iter().enumerate() {
        match ApiKeySet::from_config(set, &loaded.base_dir, &identity_headers) {
            Ok(keys) => {
                methods.insert(set.name.clone(), AuthMethod::ApiKey(Arc::new(keys)));
            }
            Err(error) => sink.error(
                format!("authentication.api_keys[{i}].{}", error.field),
                error.message,
            ),
        }
    }
    Authentication {
        identity_headers,
        shared_store,
        methods,
        revocations: registry.revocations.clone(),
        shared_revocations,
    }
}
