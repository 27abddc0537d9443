//! `portcullis::cache::Freshness::lifetime` on arbitrary response headers.
//!
//! Input: lines of `name: value` (raw bytes, so values may carry obs-text); lines that are not
//! valid header names or values are skipped. Status 200, route `ttl` 30 s (not overriding), a
//! route stale window of 5 s; each input is judged without and with credentials on a shared route.
//! Properties (RFC 9111 as `src/cache/control.rs` documents it):
//! - never panics;
//! - `no-store` or `private` anywhere in `Cache-Control` (or an unreadable `Cache-Control`),
//!   `Vary: *` (or an unreadable `Vary`), or `Set-Cookie` → not stored;
//! - a stored response's freshness is at most its `s-maxage` (else `max-age`) when given, else at
//!   most `Expires` minus `Date` (zero for an invalid `Expires`), else at most the route `ttl`;
//! - freshness and stale window are at most 2^31 s, the delta-seconds cap (RFC 9111 §1.2.2): no
//!   upstream header can make a lifetime the cache's arithmetic does not expect, and
//!   `Entry::standing` / `Entry::retention` on such an entry never panic;
//! - the stale window is zero under `must-revalidate`, `proxy-revalidate` or `no-cache`, else at
//!   least the route's 5 s;
//! - with credentials on a shared route, a stored response said `public` or a non-zero
//!   `s-maxage` (the gateway's rule, stricter than RFC 9111 §3.5: `must-revalidate` is not enough).

#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use portcullis::cache::{
    control::{parse_http_date, ResponseDirectives},
    Entry, Freshness,
};

/// The delta-seconds cap of `src/cache/control.rs`.
const MAX_DELTA: Duration = Duration::from_secs(1 << 31);

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        headers.append(name, value);
    }
    let policy = Freshness {
        default_ttl: Some(Duration::from_secs(30)),
        override_ttl: false,
        stale_while_revalidate: Duration::from_secs(5),
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let directives = ResponseDirectives::parse(&headers);
    let unreadable = |name| headers.get_all(name).iter().any(|v| v.to_str().is_err());
    for credentials in [false, true] {
        let verdict = policy.lifetime(StatusCode::OK, &headers, credentials, now);
        let Ok(lifetime) = verdict else {
            continue;
        };
        assert!(
            !directives.no_store && !directives.private,
            "stored despite no-store/private"
        );
        assert!(
            !unreadable(http::header::CACHE_CONTROL),
            "stored an unreadable Cache-Control"
        );
        assert!(
            !headers.contains_key(http::header::SET_COOKIE),
            "stored a Set-Cookie"
        );
        let vary_any = headers.get_all(http::header::VARY).iter().any(|v| {
            v.to_str()
                .map_or(true, |v| v.split(',').any(|f| f.trim() == "*"))
        });
        assert!(!vary_any, "stored Vary: *");
        let limit = if let Some(limit) = directives.s_maxage.or(directives.max_age) {
            Duration::from_secs(limit)
        } else if let Some(expires) = headers.get(http::header::EXPIRES) {
            match expires.to_str().ok().and_then(parse_http_date) {
                None => Duration::ZERO,
                Some(expires) => {
                    let date = headers
                        .get(http::header::DATE)
                        .and_then(|d| d.to_str().ok())
                        .and_then(parse_http_date)
                        .unwrap_or(now);
                    expires.duration_since(date).unwrap_or_default()
                }
            }
        } else {
            Duration::from_secs(30)
        };
        assert!(
            lifetime.fresh_for <= limit,
            "fresher than the response or route allows"
        );
        assert!(
            lifetime.fresh_for <= MAX_DELTA,
            "freshness beyond 2^31 s: {lifetime:?}"
        );
        assert!(
            lifetime.stale_for <= MAX_DELTA,
            "stale window beyond 2^31 s: {lifetime:?}"
        );
        if directives.forbids_stale() {
            assert_eq!(
                lifetime.stale_for,
                Duration::ZERO,
                "stale despite must-revalidate"
            );
            assert!(lifetime.revalidate, "must-revalidate not kept");
        } else {
            assert!(
                lifetime.stale_for >= Duration::from_secs(5),
                "route stale window lost"
            );
        }
        assert_eq!(
            lifetime.always_revalidate, directives.no_cache,
            "no-cache not kept"
        );
        if credentials {
            assert!(
                directives.public || directives.s_maxage.is_some_and(|s| s > 0),
                "shared with credentials without public or a non-zero s-maxage"
            );
        }
        let entry = Entry {
            status: StatusCode::OK,
            headers: headers.clone(),
            body: Default::default(),
            stored_at: now,
            lifetime,
            route: "r".into(),
            identity: None,
            origin: "http:".into(),
            vary: Vec::new(),
        };
        let _ = entry.retention();
        for later in [0, 1 << 31, 1 << 33, u64::from(u32::MAX) << 8] {
            let _ = entry.standing(now + Duration::from_secs(later));
        }
    }
});
