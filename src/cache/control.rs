//! The parts of RFC 9111 a gateway cache needs: response `Cache-Control` directives, whether a
//! response may be stored, and for how long it is fresh.

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, StatusCode};

/// The largest delta-seconds value (RFC 9111 §1.2.2).
const MAX_DELTA: u64 = 1 << 31;

fn all_digits(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit())
}

/// A response's `Cache-Control` directives (RFC 9111 §5.2.2), the ones a shared cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    /// `no-cache` without field names: store, but revalidate before every use.
    pub no_cache: bool,
    /// `private` (with or without field names: a qualified form is treated as unqualified, the
    /// safe reading for a shared cache).
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    /// RFC 5861.
    pub stale_while_revalidate: Option<u64>,
}

impl ResponseDirectives {
    /// Parses every `Cache-Control` field line. Unknown directives are ignored; a malformed
    /// delta-seconds disables the directive it belongs to, except `max-age`/`s-maxage`, which then
    /// count as 0 (stale: RFC 9111 §4.2.1 says to treat an invalid freshness as stale).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut directives = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                directives.no_store = true; // unreadable: be safe
                continue;
            };
            for directive in value.split(',') {
                let (name, argument) = match directive.split_once('=') {
                    Some((name, argument)) => {
                        (name.trim(), Some(argument.trim().trim_matches('"')))
                    }
                    None => (directive.trim(), None),
                };
                // delta-seconds beyond 2^31 count as 2^31 (RFC 9111 §1.2.2): an upstream cannot
                // make a lifetime that overflows arithmetic
                let seconds = || {
                    argument
                        .and_then(|a| {
                            a.parse::<u64>()
                                .ok()
                                .or_else(|| all_digits(a).then_some(MAX_DELTA))
                        })
                        .map(|s| s.min(MAX_DELTA))
                };
                match name.to_ascii_lowercase().as_str() {
                    "max-age" => directives.max_age = Some(seconds().unwrap_or(0)),
                    "s-maxage" => directives.s_maxage = Some(seconds().unwrap_or(0)),
                    "no-store" => directives.no_store = true,
                    "no-cache" => directives.no_cache = true,
                    "private" => directives.private = true,
                    "public" => directives.public = true,
                    "must-revalidate" => directives.must_revalidate = true,
                    "proxy-revalidate" => directives.proxy_revalidate = true,
                    "stale-while-revalidate" => directives.stale_while_revalidate = seconds(),
                    _ => {}
                }
            }
        }
        directives
    }

    /// Whether a stale copy must never be served without revalidating it first.
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache
    }
}

/// Statuses a cache may store without explicit freshness ("heuristically cacheable", RFC 9110
/// §15.1); with explicit freshness these are the ones this gateway stores at all.
pub fn is_cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Why a response is not stored (for the debug log and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Status,
    NoStore,
    Private,
    /// `Vary: *`: no request can ever be known to match.
    VaryAny,
    /// A cookie set for one client must not reach another.
    SetCookie,
    /// A response to a request with credentials, to be served to others, without `public` or a
    /// non-zero `s-maxage` (stricter than RFC 9111 §3.5, which also accepts `must-revalidate`).
    Authorization,
    /// No freshness from the upstream and no `ttl` on the route.
    NoFreshness,
}

/// The freshness policy of a route, from its config.
#[derive(Debug, Clone)]
pub struct Freshness {
    /// Freshness for responses that carry none.
    pub default_ttl: Option<Duration>,
    /// Use `default_ttl` even when the upstream says otherwise.
    pub override_ttl: bool,
    /// How long past freshness a stale copy may be served while it is refreshed in the
    /// background (the larger of this and the response's own `stale-while-revalidate`).
    pub stale_while_revalidate: Duration,
}

/// How long a response is fresh and may be served stale, decided when it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub fresh_for: Duration,
    pub stale_for: Duration,
    /// Serve only after a successful revalidation once stale (or always, with `no-cache`).
    pub revalidate: bool,
    pub always_revalidate: bool,
}

impl Freshness {
    /// Decides whether a response may be stored and its lifetime. `shared_with_credentials`:
    /// the request carried credentials and the entry will be served to other identities.
    pub fn lifetime(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        shared_with_credentials: bool,
        now: SystemTime,
    ) -> Result<Lifetime, NotStorable> {
        if !is_cacheable_status(status) {
            return Err(NotStorable::Status);
        }
        let directives = ResponseDirectives::parse(headers);
        if directives.no_store {
            return Err(NotStorable::NoStore);
        }
        if directives.private {
            return Err(NotStorable::Private);
        }
        if headers.get_all(header::VARY).iter().any(|v| {
            v.to_str()
                .map_or(true, |v| v.split(',').any(|f| f.trim() == "*"))
        }) {
            return Err(NotStorable::VaryAny);
        }
        if headers.contains_key(header::SET_COOKIE) {
            return Err(NotStorable::SetCookie);
        }
        // RFC 9111 §3.5 also accepts `must-revalidate` here; a zero-trust gateway wants the
        // upstream to say outright that the response may be shared
        if shared_with_credentials
            && !(directives.public || directives.s_maxage.is_some_and(|s| s > 0))
        {
            return Err(NotStorable::Authorization);
        }
        let explicit = directives
            .s_maxage
            .or(directives.max_age)
            .map(Duration::from_secs)
            .or_else(|| expires_lifetime(headers, now));
        let fresh_for = match (explicit, self.default_ttl) {
            (_, Some(ttl)) if self.override_ttl => ttl,
            (Some(lifetime), _) => lifetime,
            (None, Some(ttl)) => ttl,
            (None, None) => return Err(NotStorable::NoFreshness),
        };
        let age = headers
            .get(header::AGE)
            .and_then(|a| a.to_str().ok()?.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let stale_for = if directives.forbids_stale() {
            Duration::ZERO
        } else {
            directives
                .stale_while_revalidate
                .map(Duration::from_secs)
                .unwrap_or_default()
                .max(self.stale_while_revalidate)
        };
        Ok(Lifetime {
            fresh_for: fresh_for.saturating_sub(age),
            stale_for,
            revalidate: directives.forbids_stale(),
            always_revalidate: directives.no_cache,
        })
    }
}

/// `Expires` minus `Date` (or now), when both parse; an invalid `Expires` means already stale.
/// Capped at 2^31 s like delta-seconds: `Expires` may be up to the year 9999.
fn expires_lifetime(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = expires.to_str().ok().and_then(parse_http_date) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(parse_http_date)
        .unwrap_or(now);
    Some(
        expires
            .duration_since(date)
            .unwrap_or_default()
            .min(Duration::from_secs(MAX_DELTA)),
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form senders may generate.
pub fn parse_http_date(value: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let parsed = time::PrimitiveDateTime::parse(value.trim(), format).ok()?;
    let unix = parsed.assume_utc().unix_timestamp();
    u64::try_from(unix)
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::header_map as headers;

    fn policy(ttl: Option<u64>, override_ttl: bool) -> Freshness {
        Freshness {
            default_ttl: ttl.map(Duration::from_secs),
            override_ttl,
            stale_while_revalidate: Duration::ZERO,
        }
    }

    fn lifetime(
        policy: &Freshness,
        pairs: &[(&str, &str)],
        shared_with_credentials: bool,
    ) -> Result<Lifetime, NotStorable> {
        policy.lifetime(
            StatusCode::OK,
            &headers(pairs),
            shared_with_credentials,
            SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777),
        )
    }

    #[test]
    fn directives_parse_with_case_spaces_quotes_and_several_lines() {
        let parsed = ResponseDirectives::parse(&headers(&[
            ("cache-control", "Public, MAX-AGE=\"60\""),
            (
                "cache-control",
                "s-maxage = 5 ,stale-while-revalidate=30, must-revalidate",
            ),
        ]));
        assert_eq!(parsed.max_age, Some(60));
        assert_eq!(parsed.s_maxage, Some(5));
        assert!(parsed.public && parsed.must_revalidate);
        assert_eq!(parsed.stale_while_revalidate, Some(30));
        assert_eq!(
            ResponseDirectives::parse(&headers(&[("cache-control", "max-age=soon")])).max_age,
            Some(0),
            "an invalid max-age is stale, not absent"
        );
    }

    #[test]
    fn huge_lifetimes_are_capped_and_cannot_overflow() {
        let parsed = ResponseDirectives::parse(&headers(&[(
            "cache-control",
            "max-age=99999999999999999999999, stale-while-revalidate=18446744073709551615",
        )]));
        assert_eq!(parsed.max_age, Some(1 << 31));
        assert_eq!(parsed.stale_while_revalidate, Some(1 << 31));
        let got = lifetime(
            &policy(None, false),
            &[(
                "cache-control",
                "max-age=18446744073709551615, stale-while-revalidate=18446744073709551615",
            )],
            false,
        )
        .unwrap();
        let entry = crate::cache::Entry {
            status: StatusCode::OK,
            headers: headers(&[("etag", "\"x\"")]),
            body: bytes::Bytes::new(),
            stored_at: SystemTime::UNIX_EPOCH,
            lifetime: got,
            route: "r".into(),
            identity: None,
            origin: "http:".into(),
            vary: Vec::new(),
        };
        // neither may panic (the release profile aborts on panic)
        let _ = entry.retention();
        let _ = entry.standing(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)));
    }

    #[test]
    fn a_far_expires_is_capped_like_delta_seconds() {
        // fuzz/artifacts/cache_control/f12-*: `Expires` in the year 3940 (or 9999) made a
        // freshness of ~60 billion seconds, past the 2^31 s cap that `max-age` gets
        let cap = Duration::from_secs(1 << 31);
        for pairs in [
            &[("expires", "Thu, 01 Jan 3940 00:00:00 GMT")][..],
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ],
        ] {
            let got = lifetime(&policy(None, false), pairs, false).unwrap();
            assert_eq!(got.fresh_for, cap, "{pairs:?}");
        }
        let near = lifetime(
            &policy(None, false),
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 2061 08:49:37 GMT"),
            ],
            false,
        )
        .unwrap();
        assert!(near.fresh_for < cap, "67 years is below the cap");
    }

    #[test]
    fn s_maxage_wins_over_max_age_and_age_is_subtracted() {
        let got = lifetime(
            &policy(None, false),
            &[("cache-control", "max-age=60, s-maxage=20"), ("age", "5")],
            false,
        )
        .unwrap();
        assert_eq!(got.fresh_for, Duration::from_secs(15));
    }

    #[test]
    fn expires_counts_from_date() {
        let got = lifetime(
            &policy(None, false),
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(got.fresh_for, Duration::from_secs(60));
        let invalid = lifetime(&policy(Some(99), false), &[("expires", "0")], false).unwrap();
        assert_eq!(
            invalid.fresh_for,
            Duration::ZERO,
            "invalid Expires is stale"
        );
    }

    #[test]
    fn refusals() {
        let p = policy(Some(60), false);
        assert_eq!(
            lifetime(&p, &[("cache-control", "no-store, max-age=60")], false),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            lifetime(&p, &[("cache-control", "private=\"x\"")], false),
            Err(NotStorable::Private)
        );
        assert_eq!(
            lifetime(&p, &[("vary", "accept, *")], false),
            Err(NotStorable::VaryAny)
        );
        assert_eq!(
            lifetime(&p, &[("set-cookie", "a=b")], false),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(lifetime(&p, &[], true), Err(NotStorable::Authorization));
        assert_eq!(
            lifetime(
                &p,
                &[("cache-control", "must-revalidate, s-maxage=0")],
                true
            ),
            Err(NotStorable::Authorization),
            "framework defaults do not make a response shareable"
        );
        assert!(lifetime(&p, &[("cache-control", "public")], true).is_ok());
        assert!(lifetime(&p, &[("cache-control", "s-maxage=5")], true).is_ok());
        assert_eq!(
            lifetime(&policy(None, false), &[], false),
            Err(NotStorable::NoFreshness)
        );
        assert_eq!(
            policy(Some(5), false).lifetime(
                StatusCode::INTERNAL_SERVER_ERROR,
                &HeaderMap::new(),
                false,
                SystemTime::now()
            ),
            Err(NotStorable::Status)
        );
    }

    #[test]
    fn ttl_fills_in_or_overrides() {
        let filled = lifetime(&policy(Some(30), false), &[], false).unwrap();
        assert_eq!(filled.fresh_for, Duration::from_secs(30));
        let kept = lifetime(
            &policy(Some(30), false),
            &[("cache-control", "max-age=5")],
            false,
        );
        assert_eq!(kept.unwrap().fresh_for, Duration::from_secs(5));
        let overridden = lifetime(
            &policy(Some(30), true),
            &[("cache-control", "max-age=5")],
            false,
        );
        assert_eq!(overridden.unwrap().fresh_for, Duration::from_secs(30));
    }

    #[test]
    fn stale_serving_is_the_larger_window_unless_revalidation_is_required() {
        let mut p = policy(Some(10), false);
        p.stale_while_revalidate = Duration::from_secs(5);
        let got = lifetime(&p, &[("cache-control", "stale-while-revalidate=20")], false).unwrap();
        assert_eq!(got.stale_for, Duration::from_secs(20));
        let strict = lifetime(
            &p,
            &[("cache-control", "max-age=1, must-revalidate")],
            false,
        );
        let strict = strict.unwrap();
        assert_eq!(strict.stale_for, Duration::ZERO);
        assert!(strict.revalidate && !strict.always_revalidate);
        let no_cache = lifetime(&p, &[("cache-control", "no-cache")], false).unwrap();
        assert!(no_cache.always_revalidate);
    }
}
