//! `portcullis::compose::template`: parsing arbitrary call paths, and filling a placeholder with
//! arbitrary values.
//!
//! Input: the first line is a call path to parse; the rest is a value for `{id}` (as a route
//! parameter, and as a JSON string field of an earlier call).
//! Properties:
//! - parsing and filling never panic;
//! - a filled `/v/{id}` and `/v/{a.s}` are `/v/` followed only by RFC 3986 unreserved characters
//!   and `%XX` escapes, and percent-decode back to exactly the value: a value can never add a
//!   segment, a query or a fragment to the call.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::compose::template::{Names, Template};

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
    }
    for probe in ["/v/{id}", "/v/{a.s}"] {
        let template = Template::parse(probe, &names).expect("a valid template");
        let filled = template
            .fill(&[("id", value)], None, &results)
            .expect("the value is there");
        let encoded = filled.strip_prefix("/v/").expect("the literal stays");
        assert!(
            encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "unencoded byte in {encoded:?}"
        );
        assert_eq!(decode(encoded), value.as_bytes(), "does not decode back");
    }
});

fn decode(encoded: &str) -> Vec<u8> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}
