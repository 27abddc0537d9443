//! One stored response and what it may be served for: the route, the identity (unless the
//! route shares its cache) and the request header values its `Vary` names.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::control::Lifetime;

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    /// End-to-end headers as the upstream sent them (hop-by-hop ones already removed).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored_at: SystemTime,
    pub lifetime: Lifetime,
    pub route: Box<str>,
    /// Who the response was for; `None` for public requests and routes that share their cache.
    pub identity: Option<Box<str>>,
    /// The scheme and port the client used (`https:8443`): the upstream sees them in its
    /// forwarding headers and may build redirects and links from them.
    pub origin: Box<str>,
    /// The headers `Vary` names, with the values the request that produced it had (all field
    /// lines of a name joined, so a repeated header cannot hide behind its first line).
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// What a request is looked up by, besides its URL.
#[derive(Debug, Clone, Copy)]
pub struct VariantKey<'a> {
    pub route: &'a str,
    pub identity: Option<&'a str>,
    pub origin: &'a str,
    /// The request's headers, for the entry's `Vary`.
    pub headers: &'a HeaderMap,
}

impl VariantKey<'_> {
    /// The store key of `url` for this route, identity and origin (`Vary` variants share it).
    pub fn store_key(&self, url: &str) -> String {
        store_key(url, self.route, self.identity, self.origin)
    }
}

/// `Vary` variants kept under one store key at most (the oldest go first): a header the client
/// controls cannot grow one key without bound.
pub const MAX_VARIANTS_PER_KEY: usize = 8;

/// Separates the parts of a store key; cannot appear in a host, a normalised path or a route name.
pub const KEY_SEPARATOR: char = '\x1f';

/// `URL␟ROUTE␟IDENTITY␟ORIGIN`: a purge by URL (or URL prefix) is a prefix scan.
pub fn store_key(url: &str, route: &str, identity: Option<&str>, origin: &str) -> String {
    let identity = identity.unwrap_or("");
    let mut key =
        String::with_capacity(url.len() + route.len() + identity.len() + origin.len() + 3);
    for (i, part) in [url, route, identity, origin].into_iter().enumerate() {
        if i > 0 {
            key.push(KEY_SEPARATOR);
        }
        key.push_str(part);
    }
    key
}

/// The value of `name` in `headers` as `Vary` compares it: every field line, joined with `, `.
pub fn vary_value(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(first.clone());
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// How an entry stands at the moment it is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Fresh,
    /// Stale, but may be served while a background request refreshes it.
    StaleServable,
    /// Must be revalidated with the upstream before it is served.
    MustRevalidate,
}

impl Entry {
    /// Whether this entry may answer `key`: same route, same identity, and each `Vary` header
    /// with the same value (RFC 9111 §4.1; values compared as sent, one field line each).
    pub fn matches(&self, key: &VariantKey<'_>) -> bool {
        *self.route == *key.route
            && self.identity.as_deref() == key.identity
            && *self.origin == *key.origin
            && self
                .vary
                .iter()
                .all(|(name, value)| vary_value(key.headers, name) == *value)
    }

    /// Whether `other` would be found by the same requests (it replaces this one).
    pub fn same_variant(&self, other: &Entry) -> bool {
        self.route == other.route
            && self.identity == other.identity
            && self.origin == other.origin
            && self.vary == other.vary
    }

    /// The store key its variants share.
    pub fn store_key(&self, url: &str) -> String {
        store_key(url, &self.route, self.identity.as_deref(), &self.origin)
    }

    /// Approximate bytes held: the body, the headers and a fixed overhead.
    pub fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + headers + 256) as u64
    }

    /// Time since it was stored (the upstream's `Age` was taken off its freshness already).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at).unwrap_or_default()
    }

    /// Fresh, stale but servable, or to be revalidated, `now`.
    pub fn standing(&self, now: SystemTime) -> Standing {
        let age = self.age(now);
        if self.lifetime.always_revalidate {
            Standing::MustRevalidate
        } else if age < self.lifetime.fresh_for {
            Standing::Fresh
        } else if !self.lifetime.revalidate
            && age < self.lifetime.fresh_for + self.lifetime.stale_for
        {
            Standing::StaleServable
        } else {
            Standing::MustRevalidate
        }
    }

    /// How long a store may keep it: freshness plus the stale window, plus time to revalidate.
    pub fn retention(&self) -> Duration {
        let validators = self.headers.contains_key(header::ETAG)
            || self.headers.contains_key(header::LAST_MODIFIED);
        let extra = if validators {
            // worth keeping a while past use-by: a 304 is cheaper than the full response
            self.lifetime.fresh_for.max(Duration::from_secs(60))
        } else {
            Duration::ZERO
        };
        self.lifetime
            .fresh_for
            .saturating_add(self.lifetime.stale_for)
            .saturating_add(extra)
    }

    /// Headers for a conditional request that revalidates this entry (RFC 9111 §4.3.1).
    pub fn validators(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let etag = self
            .headers
            .get(header::ETAG)
            .map(|v| (header::IF_NONE_MATCH, v.clone()));
        let modified = self
            .headers
            .get(header::LAST_MODIFIED)
            .map(|v| (header::IF_MODIFIED_SINCE, v.clone()));
        etag.into_iter().chain(modified)
    }

    /// The entry's headers updated from a 304's (RFC 9111 §4.3.4): the 304's replace the
    /// stored ones, except the body's framing (`Content-Length`, `Content-Encoding`); the stored
    /// `Age` goes, since the 304 is the new measure of it.
    pub fn refreshed_headers(&self, not_modified: &HeaderMap) -> HeaderMap {
        let mut headers = self.headers.clone();
        headers.remove(header::AGE);
        for name in not_modified.keys() {
            if *name == header::CONTENT_LENGTH || *name == header::CONTENT_ENCODING {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers
    }

    /// The entry refreshed by a 304 (see [`Self::refreshed_headers`]), stored again `now` with a
    /// new lifetime.
    pub fn refreshed(&self, not_modified: &HeaderMap, lifetime: Lifetime, now: SystemTime) -> Self {
        Self {
            headers: self.refreshed_headers(not_modified),
            stored_at: now,
            lifetime,
            ..self.clone()
        }
    }

    /// Whether the client's own conditional request is satisfied by this entry, so that it can be
    /// answered 304 (RFC 9110 §13.1.2, §13.1.3; weak comparison for `If-None-Match`).
    pub fn satisfies_conditional(&self, request: &HeaderMap) -> bool {
        if let Some(if_none_match) = request.get(header::IF_NONE_MATCH) {
            let Some(etag) = self.headers.get(header::ETAG).and_then(|e| e.to_str().ok()) else {
                return false;
            };
            let Ok(candidates) = if_none_match.to_str() else {
                return false;
            };
            return candidates
                .split(',')
                .map(str::trim)
                .any(|c| c == "*" || weak(c) == weak(etag));
        }
        if let Some(since) = request.get(header::IF_MODIFIED_SINCE) {
            let since = since
                .to_str()
                .ok()
                .and_then(super::control::parse_http_date);
            let modified = self
                .headers
                .get(header::LAST_MODIFIED)
                .and_then(|m| m.to_str().ok())
                .and_then(super::control::parse_http_date);
            return matches!((since, modified), (Some(since), Some(modified)) if modified <= since);
        }
        false
    }
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(headers: &[(&str, &str)], fresh: u64, stale: u64, revalidate: bool) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: crate::test_support::header_map(headers),
            body: Bytes::from_static(b"body"),
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1000),
            lifetime: Lifetime {
                fresh_for: Duration::from_secs(fresh),
                stale_for: Duration::from_secs(stale),
                revalidate,
                always_revalidate: false,
            },
            route: "r".into(),
            identity: None,
            origin: "http:".into(),
            vary: vec![(
                header::ACCEPT_LANGUAGE,
                Some(HeaderValue::from_static("de")),
            )],
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + secs)
    }

    #[test]
    fn standing_moves_from_fresh_to_stale_to_revalidate() {
        let e = entry(&[], 10, 5, false);
        assert_eq!(e.standing(at(0)), Standing::Fresh);
        assert_eq!(e.standing(at(9)), Standing::Fresh);
        assert_eq!(e.standing(at(12)), Standing::StaleServable);
        assert_eq!(e.standing(at(15)), Standing::MustRevalidate);
        let strict = entry(&[], 10, 5, true);
        assert_eq!(strict.standing(at(12)), Standing::MustRevalidate);
    }

    #[test]
    fn vary_values_must_match() {
        let e = entry(&[], 10, 0, false);
        let matches = |languages: &[&'static str], origin: &str| {
            let mut headers = HeaderMap::new();
            for language in languages {
                headers.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static(language));
            }
            e.matches(&VariantKey {
                route: "r",
                identity: None,
                origin,
                headers: &headers,
            })
        };
        assert!(!matches(&[], "http:"), "absent is not `de`");
        assert!(!matches(&["en"], "http:"));
        assert!(matches(&["de"], "http:"));
        assert!(
            !matches(&["de", "evil"], "http:"),
            "a second line is part of the value"
        );
        assert!(
            !matches(&["de"], "https:"),
            "another scheme is another origin"
        );
    }

    #[test]
    fn client_conditionals() {
        let e = entry(
            &[
                ("etag", "\"v1\""),
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            10,
            0,
            false,
        );
        let request = |name: HeaderName, value: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(name, HeaderValue::from_static(value));
            map
        };
        assert!(e.satisfies_conditional(&request(header::IF_NONE_MATCH, "\"v0\", W/\"v1\"")));
        assert!(e.satisfies_conditional(&request(header::IF_NONE_MATCH, "*")));
        assert!(!e.satisfies_conditional(&request(header::IF_NONE_MATCH, "\"v2\"")));
        assert!(e.satisfies_conditional(&request(
            header::IF_MODIFIED_SINCE,
            "Sun, 06 Nov 1994 08:49:37 GMT"
        )));
        assert!(!e.satisfies_conditional(&request(
            header::IF_MODIFIED_SINCE,
            "Sun, 06 Nov 1994 08:49:36 GMT"
        )));
        assert!(!e.satisfies_conditional(&HeaderMap::new()));
    }

    #[test]
    fn a_304_updates_headers_but_not_the_body_framing() {
        let e = entry(
            &[("etag", "\"v1\""), ("content-length", "4"), ("x-a", "1")],
            10,
            0,
            false,
        );
        let mut not_modified = HeaderMap::new();
        not_modified.insert("x-a", HeaderValue::from_static("2"));
        not_modified.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let lifetime = e.lifetime;
        let fresh = e.refreshed(&not_modified, lifetime, at(50));
        assert_eq!(fresh.headers["x-a"], "2");
        assert!(
            !fresh.headers.contains_key(header::AGE),
            "the old Age is not the new one"
        );
        assert_eq!(fresh.headers[header::CONTENT_LENGTH], "4");
        assert_eq!(fresh.standing(at(51)), Standing::Fresh);
        assert_eq!(&fresh.body[..], b"body");
    }
}
