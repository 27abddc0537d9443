//! `portcullis::compose::template`: parsing arbitrary call paths, and filling placeholders with
//! arbitrary values.
//!
//! Input: the first line is a call path to parse; the rest (lossy UTF-8) is the value, used as the
//! route parameter `id`, as the subject and as the JSON string field `s` of the earlier call `a`.
//! Properties:
//! - parsing and filling never panic;
//! - `{a.s}` (a JSON field: not percent-decoded): when the value is empty, `.` or `..`, `fill`
//!   returns `Err(DotSegment("s"))`; otherwise `/v/{a.s}` fills to `/v/` followed only by RFC 3986
//!   unreserved characters and `%XX` escapes (upper-case hex, and only for bytes that are not
//!   unreserved), and that percent-decodes back to exactly the value's bytes;
//! - `{id}` (a route parameter: the matched path keeps its escapes, so `fill` percent-decodes it
//!   once, keeping an invalid escape such as `%zz` or a trailing `%4` literally): when the
//!   percent-decoding of the value is empty, `.` or `..`, `fill` returns `Err(DotSegment("id"))`;
//!   otherwise `/v/{id}` fills to `/v/` and the same alphabet, and that decodes back to exactly
//!   the percent-decoding of the value (a model written here, independently of the library's);
//! - so a value can never add a segment, a dot segment, a query or a fragment to the call;
//! - `/v/{id}` filled from an already-encoded value gives the same text again (decode once,
//!   encode once: no double encoding).

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::compose::template::{FillError, Names, Template};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (path, value) = text.split_once('\n').unwrap_or((&text, ""));
    let names = Names {
        params: &|name| name == "id",
        calls: &["a", "b"],
    };
    let results = [Some(serde_json::json!({ "s": value, "n": 3 })), None];
    if let Ok(template) = Template::parse(path, &names) {
        let _ = template.fill(&[("id", value)], Some(value), &results);
        let _ = template.fill(&[], None, &[None, None]);
    }
    let fill = |probe: &str, id: &str| {
        Template::parse(probe, &names)
            .expect("a valid template")
            .fill(&[("id", id)], None, &results)
    };
    let field = fill("/v/{a.s}", value);
    check("/v/{a.s}", value.as_bytes(), field, "s");
    let decoded = model_decode(value.as_bytes());
    let param = fill("/v/{id}", value);
    check("/v/{id}", &decoded, param.clone(), "id");
    if let Ok(filled) = param {
        // the filled text, as a route parameter again, is decoded once and encoded once
        let again = fill("/v/{id}", filled.strip_prefix("/v/").unwrap());
        assert_eq!(again, Ok(filled), "not idempotent: encoded twice");
    }
});

/// `filled` must be the encoding of `expected`, or a `DotSegment` refusal when `expected` is one.
fn check(probe: &str, expected: &[u8], filled: Result<String, FillError>, label: &str) {
    if matches!(expected, b"" | b"." | b"..") {
        assert_eq!(
            filled,
            Err(FillError::DotSegment(label.into())),
            "{probe}: {expected:?} not refused"
        );
        return;
    }
    let filled = filled.unwrap_or_else(|e| panic!("{probe}: {expected:?} refused: {e}"));
    let encoded = filled.strip_prefix("/v/").expect("the literal stays");
    let bytes = encoded.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = bytes.get(i + 1..i + 3).expect("a complete escape");
            assert!(
                escape
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
                "{probe}: bad escape in {encoded:?}"
            );
            let byte = u8::from_str_radix(std::str::from_utf8(escape).unwrap(), 16).unwrap();
            assert!(
                !unreserved(byte),
                "{probe}: unreserved byte encoded in {encoded:?}"
            );
            i += 3;
        } else {
            assert!(
                unreserved(bytes[i]),
                "{probe}: unencoded byte in {encoded:?}"
            );
            i += 1;
        }
    }
    assert_eq!(
        model_decode(bytes),
        expected,
        "{probe}: does not decode back"
    );
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Percent-decoding: `%` and two hex digits (either case) is one byte; anything else, including
/// an incomplete or invalid escape, stays as it is.
fn model_decode(value: &[u8]) -> Vec<u8> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if let (b'%', Some(&[high, low])) = (value[i], value.get(i + 1..i + 3)) {
            if let (Some(high), Some(low)) = (digit(high), digit(low)) {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
        }
        out.push(value[i]);
        i += 1;
    }
    out
}
