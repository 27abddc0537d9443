//! Routing: which route a request takes.
//!
//! **Precedence.** Routes are sorted once, at load time, from most to least specific, and the first
//! that matches wins:
//! 1. host: exact name, then `*.suffix` (longer suffix first), then routes with no host condition;
//! 2. path: compared segment by segment, literal > `{param}` > `*` > end of path > `/**`;
//! 3. routes that name methods before routes that accept any method;
//! 4. more header conditions before fewer;
//! 5. ties: the route written first in the file.

mod normalize;
mod pattern;

use std::cmp::Ordering;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

pub use normalize::{normalize_path, PathError};
pub use pattern::{HostPattern, PathPattern, PatternSegment};

/// The compiled matching conditions of one route.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub hosts: Vec<HostPattern>,
    pub path: PathPattern,
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, Option<HeaderValue>)>,
    /// Bit `i` set: served on listener `i`. `u64::MAX`: every listener.
    pub listeners: u64,
}

impl RouteMatch {
    fn matches(
        &self,
        listener: usize,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> bool {
        (self.listeners >> listener) & 1 == 1
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|(name, value)| match value {
                None => headers.contains_key(name),
                Some(expected) => headers.get_all(name).iter().any(|v| v == expected),
            })
            && self.path.matches(path)
    }

    /// Most specific first; see the module docs for the rule.
    fn precedence_cmp(&self, other: &Self) -> Ordering {
        let host_rank = |m: &Self| {
            m.hosts
                .iter()
                .map(HostPattern::rank)
                .max()
                .unwrap_or((0, 0))
        };
        host_rank(self)
            .cmp(&host_rank(other))
            .then_with(|| self.path.specificity_cmp(&other.path))
            .then_with(|| (!self.methods.is_empty()).cmp(&!other.methods.is_empty()))
            .then_with(|| self.headers.len().cmp(&other.headers.len()))
            .reverse()
    }

    /// Two routes whose conditions are identical: the later one can never be chosen.
    pub fn same_conditions(&self, other: &Self) -> bool {
        let mut a_methods: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
        let mut b_methods: Vec<&str> = other.methods.iter().map(Method::as_str).collect();
        a_methods.sort_unstable();
        b_methods.sort_unstable();
        self.hosts == other.hosts
            && self.path == other.path
            && a_methods == b_methods
            && self.headers == other.headers
            && self.listeners == other.listeners
    }
}

/// Routes in precedence order, each with its payload `R` (the compiled route).
#[derive(Debug)]
pub struct RouteTable<R> {
    entries: Vec<(RouteMatch, R)>,
}

impl<R> RouteTable<R> {
    /// Sorts `routes` (given in file order) by precedence; the sort is stable, so ties keep file order.
    pub fn new(mut routes: Vec<(RouteMatch, R)>) -> Self {
        routes.sort_by(|a, b| a.0.precedence_cmp(&b.0));
        Self { entries: routes }
    }

    /// The route for a request. `host` is lower-case without port; `path` is normalised.
    pub fn find(
        &self,
        listener: usize,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&R> {
        self.entries
            .iter()
            .find(|(m, _)| m.matches(listener, host, method, path, headers))
            .map(|(_, r)| r)
    }

    pub fn iter(&self) -> impl Iterator<Item = &R> {
        self.entries.iter().map(|(_, r)| r)
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or the `Host` header,
/// lower-cased and without port. Borrowed unless it needs lower-casing.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> std::borrow::Cow<'a, str> {
    let raw = uri
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(strip_port)
        })
        .unwrap_or("");
    let raw = raw.trim_end_matches('.');
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(raw.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(raw)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map(|(h, _)| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(hosts: &[&str], path: &str, methods: &[&str]) -> RouteMatch {
        RouteMatch {
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            path: PathPattern::parse(path).unwrap(),
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
            headers: Vec::new(),
            listeners: u64::MAX,
        }
    }

    fn find<'t>(
        table: &'t RouteTable<&'static str>,
        host: &str,
        method: &str,
        path: &str,
    ) -> Option<&'t str> {
        table
            .find(0, host, &method.parse().unwrap(), path, &HeaderMap::new())
            .copied()
    }

    #[test]
    fn most_specific_route_wins_regardless_of_file_order() {
        let table = RouteTable::new(vec![
            (route(&[], "/**", &[]), "catch-all"),
            (route(&[], "/users/**", &[]), "users"),
            (route(&[], "/users/{id}", &[]), "user"),
            (route(&[], "/users/me", &[]), "me"),
            (route(&[], "/users/{id}", &["POST"]), "user-post"),
            (route(&["*.example.com"], "/**", &[]), "wild"),
            (route(&["api.example.com"], "/**", &[]), "exact-host"),
        ]);
        assert_eq!(find(&table, "other", "GET", "/users/me"), Some("me"));
        assert_eq!(find(&table, "other", "GET", "/users/7"), Some("user"));
        assert_eq!(find(&table, "other", "POST", "/users/7"), Some("user-post"));
        assert_eq!(find(&table, "other", "GET", "/users/7/x"), Some("users"));
        assert_eq!(find(&table, "other", "GET", "/nope"), Some("catch-all"));
        assert_eq!(
            find(&table, "api.example.com", "GET", "/users/me"),
            Some("exact-host")
        );
        assert_eq!(
            find(&table, "www.example.com", "GET", "/users/me"),
            Some("wild")
        );
    }

    #[test]
    fn header_conditions_and_listeners_restrict_matches() {
        let mut canary = route(&[], "/**", &[]);
        canary.headers.push((
            HeaderName::from_static("x-canary"),
            Some(HeaderValue::from_static("1")),
        ));
        let mut internal = route(&[], "/internal/**", &[]);
        internal.listeners = 0b10;
        let table = RouteTable::new(vec![
            (route(&[], "/**", &[]), "stable"),
            (canary, "canary"),
            (internal, "internal"),
        ]);
        let mut headers = HeaderMap::new();
        assert_eq!(
            table.find(0, "h", &Method::GET, "/x", &headers),
            Some(&"stable")
        );
        headers.insert("x-canary", HeaderValue::from_static("1"));
        assert_eq!(
            table.find(0, "h", &Method::GET, "/x", &headers),
            Some(&"canary")
        );
        assert_eq!(
            table.find(0, "h", &Method::GET, "/internal/x", &HeaderMap::new()),
            Some(&"stable")
        );
        assert_eq!(
            table.find(1, "h", &Method::GET, "/internal/x", &HeaderMap::new()),
            Some(&"internal")
        );
    }

    #[test]
    fn host_is_lowercased_and_port_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::HOST,
            HeaderValue::from_static("API.Example.com:8443"),
        );
        assert_eq!(
            request_host(&"/x".parse().unwrap(), &headers),
            "api.example.com"
        );
        headers.insert(http::header::HOST, HeaderValue::from_static("[::1]:8080"));
        assert_eq!(request_host(&"/x".parse().unwrap(), &headers), "[::1]");
        assert_eq!(
            request_host(&"http://h2.example/x".parse().unwrap(), &HeaderMap::new()),
            "h2.example"
        );
    }
}
