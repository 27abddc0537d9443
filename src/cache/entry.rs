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
    /// The headers `Vary` names, with the values the request that produced it had.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// What a request is looked up by, besides its URL.
#[derive(Debug, Clone, Copy)]
pub struct VariantKey<'a> {
    pub route: &'a str,
    pub identity: Option<&'a str>,
    pub headers: &'a HeaderMap,
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
            && self
                .vary
                .iter()
                .all(|(name, value)| key.headers.get(name) == value.as_ref())
    }

    /// Whether `other` would be found by the same requests (it replaces this one).
    pub fn same_variant(&self, other: &Entry) -> bool {
        self.route == other.route && self.identity == other.identity && self.vary == other.vary
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
        self.lifetime.fresh_for + self.lifetime.stale_for + extra
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

    pub fn has_validators(&self) -> bool {
        self.validators().next().is_some()
    }

    /// The entry refreshed by a 304: its headers updated from the 304's (RFC 9111 §4.3.4),
    /// stored again now with a new lifetime.
    pub fn refreshed(&self, not_modified: &HeaderMap, lifetime: Lifetime, now: SystemTime) -> Self {
        let mut headers = self.headers.clone();
        for name in not_modified.keys() {
            if *name == header::CONTENT_LENGTH || *name == header::CONTENT_ENCODING {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        Self {
            headers,
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
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Entry {
            status: StatusCode::OK,
            headers: map,
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
        let matches = |language: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(language) = language {
                headers.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(language));
            }
            e.matches(&VariantKey {
                route: "r",
                identity: None,
                headers: &headers,
            })
        };
        assert!(!matches(None), "absent is not `de`");
        assert!(!matches(Some("en")));
        assert!(matches(Some("de")));
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
        assert_eq!(fresh.headers[header::CONTENT_LENGTH], "4");
        assert_eq!(fresh.standing(at(51)), Standing::Fresh);
        assert_eq!(&fresh.body[..], b"body");
    }
}
