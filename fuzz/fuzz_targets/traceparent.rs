//! `portcullis::telemetry::trace::parse_traceparent` on arbitrary bytes, then
//! `TraceContext::from_request` with the input as the `traceparent` header.
//!
//! Properties (W3C Trace Context, as `src/telemetry/trace.rs` documents it):
//! - never panics;
//! - the verdict equals a model read from the spec: at least 55 bytes; a two-digit lowercase hex
//!   version other than `ff`; dashes at 2, 35 and 52; 32 + 16 + 2 lowercase hex digits for the
//!   trace id, parent id and flags; neither id all zero; a version-00 value is exactly 55 bytes,
//!   a later version may go on only with a `-` after the flags;
//! - on `Some((trace, parent, flags))`: bytes 3..35, 36..52 and 53..55 are the lowercase hex of
//!   `trace`, `parent` and `flags`; re-encoded as `00-<trace>-<parent>-<flags>` it parses back to
//!   the same triple;
//! - `from_request` with that header (and with the re-encoded one) and `trusted = true` keeps the
//!   trace id, takes `parent` as its parent and the sampled flag from bit 0 of the flags; its
//!   `upstream_header()` is a version-00 value that parses back with the same trace id, the
//!   context's `span_id` as parent and the same sampled flag; with `trusted = false` the trace is
//!   a new one (`parent_id` is None);
//! - on `None` (when the input is a valid header value at all): `from_request` with
//!   `trusted = true` starts a new trace (`parent_id` is None, sampled as the ratio says).

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::telemetry::trace::{parse_traceparent, TraceContext, TRACEPARENT};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_traceparent(data);
    assert_eq!(
        parsed.is_some(),
        model_valid(data),
        "parser and model disagree on {:?}",
        String::from_utf8_lossy(data)
    );
    // not every byte string is a header value (control bytes); a valid traceparent's first 55
    // bytes always are, what a later version appends after them may not be
    let header = HeaderValue::from_bytes(data).ok();

    let Some((trace, parent, flags)) = parsed else {
        if let Some(header) = header {
            let headers = headers_with(header);
            for ratio in [0.0, 1.0] {
                let ctx = TraceContext::from_request(&headers, true, ratio);
                assert!(
                    ctx.parent_id.is_none(),
                    "an invalid traceparent was continued: {:?}",
                    String::from_utf8_lossy(data)
                );
                assert_eq!(
                    ctx.sampled,
                    ratio >= 1.0,
                    "a new trace is sampled by the ratio"
                );
                check_ids_nonzero(&ctx);
                check_upstream(&ctx);
            }
        }
        return;
    };

    assert!(data.len() >= 55, "accepted {} bytes", data.len());
    assert_ne!(&data[0..2], b"ff", "version ff accepted");
    assert!(
        data[0..2].iter().all(is_lower_hex),
        "version is not lowercase hex"
    );
    if &data[0..2] == b"00" {
        assert_eq!(data.len(), 55, "a version-00 value is exactly 55 bytes");
    }
    assert_eq!(
        &data[3..35],
        hex(&trace).as_bytes(),
        "trace id is not its lowercase hex"
    );
    assert_eq!(
        &data[36..52],
        hex(&parent).as_bytes(),
        "parent id is not its lowercase hex"
    );
    assert_eq!(
        &data[53..55],
        hex(&[flags]).as_bytes(),
        "flags are not their lowercase hex"
    );
    assert_ne!(trace, [0; 16], "all-zero trace id accepted");
    assert_ne!(parent, [0; 8], "all-zero parent id accepted");

    let reencoded = format!("00-{}-{}-{}", hex(&trace), hex(&parent), hex(&[flags]));
    assert_eq!(
        parse_traceparent(reencoded.as_bytes()),
        Some((trace, parent, flags)),
        "re-encoded {reencoded:?} does not parse back"
    );

    let values = header
        .into_iter()
        .chain([HeaderValue::from_str(&reencoded).expect("hex and dashes")]);
    for value in values {
        let headers = headers_with(value);
        for ratio in [0.0, 1.0] {
            // the caller's sampling decision wins over the ratio
            let ctx = TraceContext::from_request(&headers, true, ratio);
            assert_eq!(ctx.trace_id, trace, "trusted trace id not kept");
            assert_eq!(ctx.parent_id, Some(parent), "trusted parent not kept");
            assert_eq!(ctx.sampled, flags & 1 == 1, "sampled flag not kept");
            assert_eq!(ctx.trace_id_hex(), hex(&trace));
            check_ids_nonzero(&ctx);
            check_upstream(&ctx);

            let fresh = TraceContext::from_request(&headers, false, ratio);
            assert!(
                fresh.parent_id.is_none(),
                "an untrusted traceparent was continued"
            );
            assert_eq!(fresh.sampled, ratio >= 1.0);
            check_ids_nonzero(&fresh);
            check_upstream(&fresh);
        }
    }
});

/// The W3C rules, written from the spec rather than from the parser.
fn model_valid(v: &[u8]) -> bool {
    if v.len() < 55 {
        return false;
    }
    let hex_at = |range: std::ops::Range<usize>| v[range].iter().all(is_lower_hex);
    let dashes = v[2] == b'-' && v[35] == b'-' && v[52] == b'-';
    let fields = hex_at(0..2) && hex_at(3..35) && hex_at(36..52) && hex_at(53..55);
    let version_ok = &v[0..2] != b"ff";
    let nonzero = v[3..35].iter().any(|&b| b != b'0') && v[36..52].iter().any(|&b| b != b'0');
    let length_ok = if &v[0..2] == b"00" {
        v.len() == 55
    } else {
        v.len() == 55 || v[55] == b'-'
    };
    dashes && fields && version_ok && nonzero && length_ok
}

/// The `traceparent` the upstream would receive: version 00, this trace, the gateway's span.
fn check_upstream(ctx: &TraceContext) {
    let header = ctx.upstream_header();
    let bytes = header.as_bytes();
    assert_eq!(bytes.len(), 55, "upstream header is not 55 bytes");
    assert_eq!(&bytes[..3], b"00-");
    assert_eq!(
        parse_traceparent(bytes),
        Some((ctx.trace_id, ctx.span_id, u8::from(ctx.sampled))),
        "upstream header {:?} does not name this trace and span",
        String::from_utf8_lossy(bytes)
    );
}

fn check_ids_nonzero(ctx: &TraceContext) {
    assert_ne!(ctx.trace_id, [0; 16]);
    assert_ne!(ctx.server_span_id, [0; 8]);
    assert_ne!(ctx.span_id, [0; 8]);
}

fn headers_with(value: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(TRACEPARENT, value);
    headers
}

fn is_lower_hex(b: &u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
