//! `portcullis::cache::Freshness::lifetime` on arbitrary response headers.
//!
//! Input: lines of `name: value`; lines that are not valid header names or values are skipped.
//! Properties (RFC 9111 as `src/cache/control.rs` documents it):
//! - never panics;
//! - `no-store` or `private` anywhere in `Cache-Control`, `Vary: *`, or `Set-Cookie` → not stored;
//! - a stored response's freshness is at most its `s-maxage` (else `max-age`) when given, and the
//!   route `ttl` when the upstream gave none; its stale window is zero under `must-revalidate`,
//!   `proxy-revalidate` or `no-cache`;
//! - with credentials on a shared route, a stored response said `public`, `s-maxage` or
//!   `must-revalidate`.

#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use portcullis::cache::{control::ResponseDirectives, Freshness};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut headers = HeaderMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) else {
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
    for credentials in [false, true] {
        let verdict = policy.lifetime(StatusCode::OK, &headers, credentials, now);
        let Ok(lifetime) = verdict else {
            continue;
        };
        assert!(!directives.no_store && !directives.private, "stored despite no-store/private");
        assert!(!headers.contains_key(http::header::SET_COOKIE), "stored a Set-Cookie");
        let vary_any = headers.get_all(http::header::VARY).iter().any(|v| {
            v.to_str().map_or(true, |v| v.split(',').any(|f| f.trim() == "*"))
        });
        assert!(!vary_any, "stored Vary: *");
        if let Some(limit) = directives.s_maxage.or(directives.max_age) {
            assert!(lifetime.fresh_for <= Duration::from_secs(limit), "fresher than max-age");
        }
        if directives.forbids_stale() {
            assert_eq!(lifetime.stale_for, Duration::ZERO, "stale despite must-revalidate");
        }
        if credentials {
            assert!(
                directives.public || directives.s_maxage.is_some() || directives.must_revalidate,
                "shared with credentials without public/s-maxage/must-revalidate"
            );
        }
    }
});
