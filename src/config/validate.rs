//! Semantic checks on the typed model: references between sections, duplicates, addresses, and the
//! zero-trust rule. Files (certificates, keys) are checked when they are loaded, in the compile step.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use serde_yaml::Value;

use super::{
    model::{AuthenticationConfig, Config, FailureMode, TokenSourceConfig},
    ErrorSink,
};
use crate::route::{HostPattern, PathPattern};

/// Names declared in the file, including items that failed to parse (so that they do not cause a
/// second, misleading "unknown upstream" error).
#[derive(Debug, Default)]
pub struct Declared {
    upstreams: HashSet<String>,
    /// Names of every authentication method (`jwt`, `api_keys`, `introspection`, `mtls`).
    auth_methods: HashSet<String>,
    listeners: HashSet<String>,
    /// Listener items written, parsable or not.
    listener_items: usize,
}

impl Declared {
    pub fn from_raw(root: &Value) -> Self {
        let names = |section: &str| -> HashSet<String> {
            root.get(section)
                .and_then(Value::as_sequence)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| {
                            item.get("name").and_then(Value::as_str).map(str::to_owned)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let auth_names = |kind: &str| -> Vec<String> {
            root.get("authentication")
                .and_then(|a| a.get(kind))
                .and_then(Value::as_sequence)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| {
                            item.get("name").and_then(Value::as_str).map(str::to_owned)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            auth_methods: auth_names("jwt")
                .into_iter()
                .chain(auth_names("api_keys"))
                .chain(auth_names("introspection"))
                .chain(auth_names("mtls"))
                .collect(),
            upstreams: names("upstreams"),
            listeners: names("listeners"),
            listener_items: root
                .get("listeners")
                .and_then(Value::as_sequence)
                .map_or(0, Vec::len),
        }
    }
}

pub fn check(config: &Config, declared: &Declared, sink: &mut ErrorSink<'_>) {
    check_server(config, sink);
    check_authentication(config, sink);
    check_authorization(config, declared, sink);
    if declared.listener_items == 0 {
        sink.error("listeners", "at least one listener is required");
    }
    check_listeners(config, sink);
    check_upstreams(config, sink);
    check_routes(config, declared, sink);
}

/// Every header name the gateway sets from a verified identity (lower case).
fn identity_header_names(config: &Config) -> Vec<String> {
    let names = &config.authentication.identity_headers;
    let mut all: Vec<String> = [
        &names.subject,
        &names.issuer,
        &names.method,
        &names.provider,
        &names.roles,
    ]
    .iter()
    .map(|n| n.to_ascii_lowercase())
    .collect();
    for provider in &config.authentication.jwt {
        all.extend(
            provider
                .claim_headers
                .values()
                .map(|h| h.to_ascii_lowercase()),
        );
    }
    all
}

/// Headers that carry credentials (lower case): never identity headers, never sent to a policy
/// service, never logged in the clear.
pub fn credential_headers(section: &AuthenticationConfig) -> Vec<String> {
    let mut headers: Vec<String> = ["authorization", "proxy-authorization", "cookie", "dpop"]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    headers.extend(
        section
            .api_keys
            .iter()
            .map(|s| s.header.to_ascii_lowercase()),
    );
    headers.extend(section.jwt.iter().filter_map(|p| match &p.token_source {
        TokenSourceConfig::Header(name) => Some(name.to_ascii_lowercase()),
        _ => None,
    }));
    headers
}

/// Query parameters that carry credentials (JWT and API-key query sources): never logged in the
/// clear.
pub fn credential_query_params(section: &AuthenticationConfig) -> Vec<String> {
    let jwt = section.jwt.iter().filter_map(|p| match &p.token_source {
        TokenSourceConfig::Query(name) => Some(name.clone()),
        _ => None,
    });
    let api_keys = section.api_keys.iter().filter_map(|s| s.query.clone());
    jwt.chain(api_keys).collect()
}

/// Checks of `authorization` against other sections (references into the section itself, the
/// role graph and permissions are checked where they are compiled, in `policy::authz`).
fn check_authorization(config: &Config, declared: &Declared, sink: &mut ErrorSink<'_>) {
    let section = &config.authorization;
    let provider_lists = section
        .roles
        .iter()
        .enumerate()
        .map(|(i, role)| (format!("authorization.roles[{i}]"), &role.providers))
        .chain(
            section
                .assignments
                .iter()
                .enumerate()
                .map(|(i, assignment)| {
                    (
                        format!("authorization.assignments[{i}]"),
                        &assignment.providers,
                    )
                }),
        );
    for (path, providers) in provider_lists {
        for (j, provider) in providers.iter().enumerate() {
            if !declared.auth_methods.contains(provider) {
                sink.error(
                    format!("{path}.providers[{j}]"),
                    format!("no authentication method is named `{provider}`"),
                );
            }
        }
    }
    for (i, assignment) in section.assignments.iter().enumerate() {
        if !assignment.subjects.is_empty()
            && assignment.providers.is_empty()
            && declared.auth_methods.len() > 1
        {
            sink.warn(
                format!("authorization.assignments[{i}].subjects"),
                "without `providers`, a subject verified by any authentication method gets these roles (an API key id or a certificate name could equal a user's subject)",
            );
        }
    }
    let credentials = credential_headers(&config.authentication);
    for (i, service) in section.external.iter().enumerate() {
        for (j, header) in service.headers.iter().enumerate() {
            if credentials.contains(&header.to_ascii_lowercase()) {
                sink.error(
                    format!("authorization.external[{i}].headers[{j}]"),
                    format!("`{header}` carries credentials; it is never sent to a policy service"),
                );
            }
        }
        if service.timeout.0.is_zero() {
            sink.error(
                format!("authorization.external[{i}].timeout"),
                "must be more than 0",
            );
        }
        if service.on_error == FailureMode::Allow {
            sink.warn(
                format!("authorization.external[{i}].on_error"),
                "`allow` lets requests through whenever the policy service is down or slow (fail open)",
            );
        }
    }
}

fn check_authentication(config: &Config, sink: &mut ErrorSink<'_>) {
    let section = &config.authentication;
    let mut names: HashMap<&str, String> = HashMap::new();
    let jwt = section
        .jwt
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), format!("authentication.jwt[{i}]")));
    let keys = section
        .api_keys
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), format!("authentication.api_keys[{i}]")));
    let introspection = section.introspection.iter().enumerate().map(|(i, p)| {
        (
            p.name.as_str(),
            format!("authentication.introspection[{i}]"),
        )
    });
    let mtls = section
        .mtls
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), format!("authentication.mtls[{i}]")));
    if !section.mtls.is_empty()
        && !config
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth.is_some()))
    {
        sink.warn(
            "authentication.mtls",
            "no listener asks for client certificates (`tls.client_auth`): these methods can never succeed",
        );
    }
    for (name, path) in jwt.chain(keys).chain(introspection).chain(mtls) {
        if let Some(first) = names.insert(name, path.clone()) {
            sink.error(
                format!("{path}.name"),
                format!("duplicate authentication method name `{name}` (first at {first})"),
            );
        }
    }
    // identity headers carry what the gateway verified: they must not double as framing,
    // routing or credential headers
    let reserved = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "authorization",
        "cookie",
        "x-request-id",
        "x-forwarded-for",
        "forwarded",
    ];
    let credential_headers = credential_headers(section);
    let names = &section.identity_headers;
    let identity = [
        ("subject", &names.subject),
        ("issuer", &names.issuer),
        ("method", &names.method),
        ("provider", &names.provider),
        ("roles", &names.roles),
    ];
    for (field, name) in identity {
        let lower = name.to_ascii_lowercase();
        if reserved.contains(&lower.as_str()) || credential_headers.contains(&lower) {
            sink.error(
                format!("authentication.identity_headers.{field}"),
                format!("`{name}` is a framing, routing or credential header and cannot carry an identity"),
            );
        }
    }
    for (i, provider) in section.jwt.iter().enumerate() {
        for header in provider.claim_headers.values() {
            let lower = header.to_ascii_lowercase();
            if reserved.contains(&lower.as_str()) || credential_headers.contains(&lower) {
                sink.error(
                    format!("authentication.jwt[{i}].claim_headers"),
                    format!("`{header}` is a framing, routing or credential header and cannot carry a claim"),
                );
            }
        }
        if provider.audiences.is_empty() {
            sink.warn(
                format!("authentication.jwt[{i}].audiences"),
                "no audiences: any token this issuer's keys signed, for any client, is accepted",
            );
        }
        if provider.issuer.is_none()
            && matches!(
                provider.keys,
                crate::config::model::JwtKeysConfig::JwksUrl { .. }
            )
        {
            sink.warn(
                format!("authentication.jwt[{i}].issuer"),
                "no issuer: `iss` is not checked",
            );
        }
    }
    for (i, provider) in section.jwt.iter().enumerate() {
        if provider.algorithms.is_empty() {
            sink.error(
                format!("authentication.jwt[{i}].algorithms"),
                "at least one algorithm is required",
            );
        }
        match &provider.token_source {
            crate::config::model::TokenSourceConfig::Header(name)
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() =>
            {
                sink.error(
                    format!("authentication.jwt[{i}].token_source.header"),
                    format!("`{name}` is not a valid header name"),
                );
            }
            crate::config::model::TokenSourceConfig::Cookie(name)
            | crate::config::model::TokenSourceConfig::Query(name)
                if name.is_empty() || name.contains([';', '=', '&', ' ']) =>
            {
                sink.error(
                    format!("authentication.jwt[{i}].token_source"),
                    format!("`{name}` is not a usable cookie or parameter name"),
                );
            }
            _ => {}
        }
        if let crate::config::model::JwtKeysConfig::JwksUrl {
            refresh_interval,
            min_refresh_interval,
            ..
        }
        | crate::config::model::JwtKeysConfig::OidcIssuer {
            refresh_interval,
            min_refresh_interval,
            ..
        } = &provider.keys
        {
            if refresh_interval.0 < std::time::Duration::from_millis(100)
                || min_refresh_interval.0 < std::time::Duration::from_millis(100)
            {
                sink.error(
                    format!("authentication.jwt[{i}].keys.jwks_url"),
                    "`refresh_interval` and `min_refresh_interval` must be at least 100ms",
                );
            }
        }
        for header in provider.claim_headers.values() {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                sink.error(
                    format!("authentication.jwt[{i}].claim_headers"),
                    format!("`{header}` is not a valid header name"),
                );
            }
        }
    }
    if config.redis.as_ref().is_some_and(|r| r.timeout.0.is_zero()) {
        sink.error("redis.timeout", "must be greater than zero");
    }
    for (i, provider) in section.introspection.iter().enumerate() {
        if provider.timeout.0.is_zero() {
            sink.error(
                format!("authentication.introspection[{i}].timeout"),
                "must be greater than zero",
            );
        }
    }
    for (i, set) in section.api_keys.iter().enumerate() {
        if set.keys.is_empty() && set.keys_file.is_none() {
            sink.warn(
                format!("authentication.api_keys[{i}].keys"),
                "this key set has no keys: it accepts nothing",
            );
        }
    }
}

/// `sun_path` holds 108 bytes, the last one the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

fn check_server(config: &Config, sink: &mut ErrorSink<'_>) {
    if tracing_subscriber::EnvFilter::try_new(&config.server.log.level).is_err() {
        sink.error(
            "server.log.level",
            format!(
                "`{}` is not a log filter such as `info` or `portcullis=debug,info`",
                config.server.log.level
            ),
        );
    }
    if config.server.workers == Some(0) {
        sink.error(
            "server.workers",
            "must be at least 1 (or left out for one per CPU core)",
        );
    }
    for (i, cidr) in config.server.trusted_proxies.iter().enumerate() {
        if parse_cidr(cidr).is_none() {
            sink.error(
                format!("server.trusted_proxies[{i}]"),
                format!("`{cidr}` is not a CIDR (e.g. `10.0.0.0/8`) or IP address"),
            );
        }
    }
    if let Some(path) = &config.server.upgrade_socket {
        let length = path.as_os_str().len();
        if length == 0 {
            sink.error(
                "server.upgrade_socket",
                "must not be empty (leave it out for no hand-over)",
            );
        } else if length > MAX_UNIX_SOCKET_PATH {
            sink.error(
                "server.upgrade_socket",
                format!(
                    "a Unix socket path may have at most {MAX_UNIX_SOCKET_PATH} bytes; this one has {length}"
                ),
            );
        }
    }
    if config.admin.enabled && config.admin.bind.parse::<SocketAddr>().is_err() {
        sink.error(
            "admin.bind",
            format!(
                "`{}` is not an address such as `127.0.0.1:9901`",
                config.admin.bind
            ),
        );
    }
}

/// Parses `10.0.0.0/8` or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

fn check_listeners(config: &Config, sink: &mut ErrorSink<'_>) {
    let mut names = HashMap::new();
    let mut binds = HashMap::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        if let Some(first) = names.insert(listener.name.as_str(), i) {
            sink.error(
                format!("{path}.name"),
                format!(
                    "duplicate listener name `{}` (first at listeners[{first}])",
                    listener.name
                ),
            );
        }
        match listener.bind.parse::<SocketAddr>() {
            Err(_) => sink.error(
                format!("{path}.bind"),
                format!(
                    "`{}` is not an address such as `0.0.0.0:8080` or `[::]:8443`",
                    listener.bind
                ),
            ),
            Ok(addr) if addr.port() != 0 => {
                if let Some(first) = binds.insert(addr, i) {
                    sink.error(
                        format!("{path}.bind"),
                        format!("address {addr} is already used by listeners[{first}]"),
                    );
                }
            }
            Ok(_) => {}
        }
        if let Some(tls) = &listener.tls {
            if tls.certificates.is_empty() {
                sink.error(
                    format!("{path}.tls.certificates"),
                    "TLS needs at least one certificate",
                );
            }
            for (c, cert) in tls.certificates.iter().enumerate() {
                for (n, name) in cert.server_names.iter().enumerate() {
                    if HostPattern::parse(name).is_err() {
                        sink.error(
                            format!("{path}.tls.certificates[{c}].server_names[{n}]"),
                            format!("`{name}` is not a DNS name or `*.` wildcard"),
                        );
                    }
                }
            }
        }
        if let Some(http3) = listener.http3() {
            if listener.tls.is_none() {
                sink.error(
                    format!("{path}.http3"),
                    "HTTP/3 runs over QUIC, which always uses TLS: add `tls` to this listener or remove `http3`",
                );
            }
            if http3.max_streams == 0 {
                sink.error(
                    format!("{path}.http3.max_streams"),
                    "must be greater than zero",
                );
            }
        }
        let limits = &listener.limits;
        for (field, zero) in [
            ("max_header_bytes", limits.max_header_bytes.0 < 1024),
            ("max_headers", limits.max_headers == 0),
            ("header_timeout", limits.header_timeout.0.is_zero()),
            ("idle_timeout", limits.idle_timeout.0.is_zero()),
            ("max_connections", limits.max_connections == 0),
        ] {
            if zero {
                let hint = if field == "max_header_bytes" {
                    "at least 1KiB"
                } else {
                    "greater than zero"
                };
                sink.error(format!("{path}.limits.{field}"), format!("must be {hint}"));
            }
        }
    }
    if config.listeners.len() > 64 {
        sink.error("listeners", "at most 64 listeners are supported");
    }
}

fn check_upstreams(config: &Config, sink: &mut ErrorSink<'_>) {
    let mut names = HashMap::new();
    let used: HashSet<&str> = config
        .routes
        .iter()
        .flat_map(|r| {
            let calls = r.compose.iter().flat_map(|c| &c.calls);
            std::iter::once(r.upstream.as_str())
                .chain(calls.filter_map(|call| call.upstream.as_deref()))
        })
        .collect();
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let path = format!("upstreams[{i}]");
        if let Some(first) = names.insert(upstream.name.as_str(), i) {
            sink.error(
                format!("{path}.name"),
                format!(
                    "duplicate upstream name `{}` (first at upstreams[{first}])",
                    upstream.name
                ),
            );
        }
        if !used.contains(upstream.name.as_str()) {
            sink.warn(
                format!("{path}.name"),
                format!("upstream `{}` is not used by any route", upstream.name),
            );
        }
        if upstream.targets.is_empty() {
            sink.error(
                format!("{path}.targets"),
                "an upstream needs at least one target",
            );
        }
        let mut schemes = HashSet::new();
        for (t, target) in upstream.targets.iter().enumerate() {
            let target_path = format!("{path}.targets[{t}]");
            match parse_target_url(&target.url) {
                Ok((scheme, _)) => {
                    schemes.insert(scheme);
                }
                Err(message) => sink.error(format!("{target_path}.url"), message),
            }
            if !(1..=1000).contains(&target.weight) {
                sink.error(
                    format!("{target_path}.weight"),
                    "weight must be between 1 and 1000",
                );
            }
        }
        if schemes.len() > 1 {
            sink.error(
                format!("{path}.targets"),
                "all targets of an upstream must use the same scheme",
            );
        }
        if let Some(tls) = &upstream.tls {
            if !schemes.contains("https") && !schemes.is_empty() {
                sink.warn(
                    format!("{path}.tls"),
                    "`tls` only applies to `https://` targets",
                );
            }
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                sink.error(
                    format!("{path}.tls"),
                    "`client_cert` and `client_key` go together",
                );
            }
        }
        if let Some(check) = &upstream.health_check {
            if !check.path.starts_with('/') {
                sink.error(format!("{path}.health_check.path"), "must start with `/`");
            }
            if check.healthy_threshold == 0 || check.unhealthy_threshold == 0 {
                sink.error(
                    format!("{path}.health_check"),
                    "thresholds must be at least 1",
                );
            }
            if check.interval.0.is_zero() || check.timeout.0.is_zero() {
                sink.error(
                    format!("{path}.health_check"),
                    "`interval` and `timeout` must be greater than zero",
                );
            }
        }
        if let Some(outlier) = &upstream.outlier_detection {
            if outlier.consecutive_failures == 0 {
                sink.error(
                    format!("{path}.outlier_detection.consecutive_failures"),
                    "must be at least 1",
                );
            }
            if outlier.max_ejection_percent > 100 {
                sink.error(
                    format!("{path}.outlier_detection.max_ejection_percent"),
                    "must be at most 100",
                );
            }
        }
        let timeouts = &upstream.timeouts;
        for (field, value) in [
            ("connect", timeouts.connect),
            ("per_try", timeouts.per_try),
            ("total", timeouts.total),
        ] {
            if value.0.is_zero() {
                sink.error(
                    format!("{path}.timeouts.{field}"),
                    "must be greater than zero",
                );
            }
        }
        if timeouts.per_try > timeouts.total {
            sink.warn(
                format!("{path}.timeouts.per_try"),
                "is longer than `total`, which caps it",
            );
        }
        if let crate::config::model::LoadBalancing::ConsistentHash {
            hash_on: crate::config::model::HashOn::Header(name),
        } = &upstream.load_balancing
        {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                sink.error(
                    format!("{path}.load_balancing.hash_on.header"),
                    format!("`{name}` is not a valid header name"),
                );
            }
        }
    }
}

/// Splits a target URL into its scheme and `host:port` authority (default port filled in).
pub fn parse_target_url(url: &str) -> Result<(&'static str, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("target `{url}` must look like `http://host:port`, `h2c://host:port` or `https://host:port`"))?;
    let (scheme, default_port) = match scheme {
        "http" => ("http", 80),
        "h2c" => ("h2c", 80),
        "https" => ("https", 443),
        other => {
            return Err(format!(
                "target scheme `{other}` is not one of `http`, `h2c`, `https`"
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "target `{url}` must be only scheme, host and port (no path, query or credentials)"
        ));
    }
    let parsed: http::uri::Authority = authority
        .parse()
        .map_err(|_| format!("target `{url}` has an invalid host or port"))?;
    let port = parsed.port_u16().unwrap_or(default_port);
    Ok((scheme, format!("{}:{port}", parsed.host())))
}

fn check_routes(config: &Config, declared: &Declared, sink: &mut ErrorSink<'_>) {
    let mut names = HashMap::new();
    let mut seen_conditions: Vec<(usize, String)> = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(first) = names.insert(route.name.as_str(), i) {
            sink.error(
                format!("{path}.name"),
                format!(
                    "duplicate route name `{}` (first at routes[{first}])",
                    route.name
                ),
            );
        }
        if !declared.upstreams.contains(&route.upstream) {
            sink.error(
                format!("{path}.upstream"),
                format!("unknown upstream `{}`", route.upstream),
            );
        }
        match (route.public, route.auth.is_empty()) {
            (false, true) => sink.error(
                format!("{path}.public"),
                format!(
                    "route `{}` declares no authentication: zero trust requires authentication on every route \
                     (`auth: [...]`), or `public: true` to serve it to anyone",
                    route.name
                ),
            ),
            (true, false) => sink.error(
                format!("{path}.auth"),
                "a route is either `public: true` or has `auth`, not both",
            ),
            _ => {}
        }
        for (a, name) in route.auth.iter().enumerate() {
            if !declared.auth_methods.contains(name) {
                sink.error(
                    format!("{path}.auth[{a}]"),
                    format!("unknown authentication method `{name}` (define it under `authentication.jwt`, `authentication.api_keys`, `authentication.introspection` or `authentication.mtls`)"),
                );
            }
        }
        if let Err(message) = PathPattern::parse(&route.matcher.path) {
            sink.error(format!("{path}.match.path"), message);
        }
        for (h, host) in route.matcher.hosts.iter().enumerate() {
            if let Err(message) = HostPattern::parse(host) {
                sink.error(format!("{path}.match.hosts[{h}]"), message);
            }
        }
        for (m, method) in route.matcher.methods.iter().enumerate() {
            if http::Method::from_bytes(method.as_bytes()).is_err()
                || method.chars().any(|c| c.is_ascii_lowercase())
            {
                sink.error(
                    format!("{path}.match.methods[{m}]"),
                    format!("`{method}` is not an upper-case HTTP method"),
                );
            }
        }
        let identity_names = identity_header_names(config);
        for (h, header) in route.matcher.headers.iter().enumerate() {
            if identity_names.contains(&header.name.to_ascii_lowercase().replace('_', "-")) {
                sink.error(
                    format!("{path}.match.headers[{h}].name"),
                    format!("`{}` is an identity header: routes cannot match on what clients may not send", header.name),
                );
            }
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                sink.error(
                    format!("{path}.match.headers[{h}].name"),
                    format!("`{}` is not a valid header name", header.name),
                );
            }
            if let Some(value) = &header.value {
                if http::HeaderValue::from_str(value).is_err() {
                    sink.error(
                        format!("{path}.match.headers[{h}].value"),
                        "not a valid header value",
                    );
                }
            }
        }
        for (l, listener) in route.listeners.iter().enumerate() {
            if !declared.listeners.contains(listener) {
                sink.error(
                    format!("{path}.listeners[{l}]"),
                    format!("unknown listener `{listener}`"),
                );
            }
        }
        if let Some(rewrite) = &route.rewrite {
            for (field, value) in [
                ("strip_prefix", &rewrite.strip_prefix),
                ("add_prefix", &rewrite.add_prefix),
            ] {
                if let Some(value) = value {
                    if !value.starts_with('/')
                        || value.ends_with('/') && value.len() > 1
                        || value.contains(['?', '#', '%', '\\'])
                    {
                        sink.error(
                            format!("{path}.rewrite.{field}"),
                            "must start with `/`, not end with `/`, and contain no `?`, `#`, `%` or `\\`",
                        );
                    }
                }
            }
            if let Some(host) = &rewrite.host {
                if http::uri::Authority::try_from(host.as_str()).is_err() {
                    sink.error(
                        format!("{path}.rewrite.host"),
                        format!("`{host}` is not a valid host"),
                    );
                }
                if rewrite.host_from_target {
                    sink.error(
                        format!("{path}.rewrite.host_from_target"),
                        "set either `host` or `host_from_target`, not both",
                    );
                }
            }
        }
        // a route whose conditions repeat an earlier route's can never be chosen
        let mut methods = route.matcher.methods.clone();
        methods.sort();
        let mut hosts: Vec<String> = route
            .matcher
            .hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        hosts.sort();
        let mut listeners = route.listeners.clone();
        listeners.sort();
        let headers: Vec<String> = route
            .matcher
            .headers
            .iter()
            .map(|h| format!("{}={:?}", h.name.to_ascii_lowercase(), h.value))
            .collect();
        let key = format!(
            "{hosts:?}|{}|{methods:?}|{headers:?}|{listeners:?}",
            route.matcher.path.trim_end_matches('/')
        );
        if let Some((first, _)) = seen_conditions.iter().find(|(_, k)| *k == key) {
            sink.error(
                format!("{path}.match"),
                format!(
                    "route `{}` is unreachable: routes[{first}] matches exactly the same requests and comes first",
                    route.name
                ),
            );
        } else {
            seen_conditions.push((i, key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_target_url;

    #[test]
    fn target_urls_need_scheme_host_and_port_only() {
        assert_eq!(
            parse_target_url("http://127.0.0.1:9000").unwrap(),
            ("http", "127.0.0.1:9000".into())
        );
        assert_eq!(
            parse_target_url("https://api.internal").unwrap(),
            ("https", "api.internal:443".into())
        );
        assert_eq!(
            parse_target_url("h2c://[::1]:50051/").unwrap(),
            ("h2c", "[::1]:50051".into())
        );
        assert!(parse_target_url("ftp://x").is_err());
        assert!(parse_target_url("http://x/path").is_err());
        assert!(parse_target_url("http://user@x").is_err());
        assert!(parse_target_url("x:80").is_err());
    }
}
