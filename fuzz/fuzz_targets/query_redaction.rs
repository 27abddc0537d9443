//! `portcullis::telemetry::access_log::AccessLogPolicy::redact_query`, the query string as the
//! access log writes it, on arbitrary UTF-8.
//!
//! The policy is compiled from the default `AccessLogConfig` with one JWT provider reading its
//! token from the query parameter `Session_JWT` (so the secret names are the built-in list plus
//! `session_jwt`; config names are case-folded when compiled).
//!
//! Properties (from `src/telemetry/redact.rs` and docs/observability.md, "Redaction"):
//! - never panics;
//! - the output has as many `&`-separated pairs as the input; a pair none of whose `;`-separated
//!   parts has a name the gateway calls secret (`redact::is_secret`), and whose own name (all
//!   before its first `=`) is not secret, is unchanged; a pair with a secret name is
//!   `name=[redacted]`; otherwise the pair is kept up to the first secret part's name and `=`,
//!   followed by `[redacted]` (the rest of the pair, which some frameworks read as part of the
//!   value, is dropped). Redacting the output again changes nothing;
//! - no secret value survives in the logged query as the upstream's framework would read it.
//!   The logged query is parsed the way common frameworks parse a query string, and no parameter
//!   they would look up under a secret name from an independent list (compared
//!   case-insensitively) may carry a non-empty value other than `[redacted]`:
//!   - `whatwg`: `&`-separated, name before the first `=`, percent-decoded (URLSearchParams, Go
//!     `url.ParseQuery` since 1.17, Python `parse_qs` since 3.9.2, Rust `form_urlencoded`);
//!   - `brackets`: `access_token[]=…` / `access_token[0]=…` is the parameter `access_token`
//!     holding a list (PHP, Rack/Rails, Express `qs`);
//!   - `php`: PHP's `$_GET` names: cut at a NUL byte, leading spaces dropped, `.` and ` ` turned
//!     into `_` (up to the first `[`), an unclosed `[` turned into `_` (`php_register_variable_ex`);
//!   - `semicolon`: `;` separates pairs as well as `&` (Python `parse_qs` before 3.9.2, Go
//!     `url.ParseQuery` before 1.17, Perl CGI).
//!
//!   The last three found F5 and F6 (docs/fuzzing.md), fixed by redacting normalised names and
//!   `;`-joined values.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::{
    config::model::AccessLogConfig,
    telemetry::{access_log::AccessLogPolicy, redact},
};

const REDACTED: &str = "[redacted]";

/// The built-in list (docs/observability.md) and the configured token parameter, case-folded.
const SECRET_NAMES: &[&str] = &[
    "access_token",
    "token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
    "client_secret",
    "code",
    "signature",
    "sig",
    "session_jwt",
];

fn policy() -> &'static AccessLogPolicy {
    static POLICY: OnceLock<AccessLogPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        AccessLogPolicy::compile(
            &AccessLogConfig::default(),
            &["authorization".to_owned(), "x-api-key".to_owned()],
            &["Session_JWT".to_owned()],
        )
        .expect("the default access log config compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let policy = policy();
    let out = policy.redact_query(query);

    let inputs: Vec<&str> = query.split('&').collect();
    let outputs: Vec<&str> = out.split('&').collect();
    assert_eq!(
        outputs.len(),
        inputs.len(),
        "pair count changed: {query:?} → {out:?}"
    );
    let extra = [redact::normalize("Session_JWT")];
    for (input, output) in inputs.iter().zip(&outputs) {
        let mut offset = 0;
        let mut expected = input
            .split_once('=')
            .filter(|(name, _)| redact::is_secret(name, &extra))
            .map(|(name, _)| format!("{name}={REDACTED}"));
        for part in input.split(';').take_while(|_| expected.is_none()) {
            if let Some((name, _)) = part.split_once('=') {
                if redact::is_secret(name, &extra) {
                    expected = Some(format!("{}{name}={REDACTED}", &input[..offset]));
                    break;
                }
            }
            offset += part.len() + 1;
        }
        match expected {
            Some(expected) => assert_eq!(
                *output, expected,
                "secret part not redacted as documented: {input:?} (in {query:?})"
            ),
            None => assert_eq!(
                output, input,
                "pair changed: {input:?} → {output:?} (in {query:?})"
            ),
        }
    }
    assert_eq!(
        policy.redact_query(&out),
        out,
        "not idempotent on {query:?}"
    );

    for view in VIEWS {
        for (key, value) in (view.parse)(&out) {
            assert!(
                !is_secret(&key) || value.is_empty() || value == REDACTED,
                "{}: the logged query {out:?} (from {query:?}) carries parameter {key:?} = {value:?}",
                view.name
            );
        }
    }
});

fn is_secret(decoded_name: &str) -> bool {
    SECRET_NAMES.contains(&decoded_name.to_ascii_lowercase().as_str())
}

fn split_pair(pair: &str) -> (&str, Option<&str>) {
    match pair.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (pair, None),
    }
}

/// `application/x-www-form-urlencoded` decoding (WHATWG URL, "percent-decode" after `+` → space).
fn decode_bytes(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |b: u8| (b as char).to_digit(16).expect("hex digit") as u8;
                out.push(hex(bytes[i + 1]) << 4 | hex(bytes[i + 2]));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn decode(text: &str) -> String {
    String::from_utf8_lossy(&decode_bytes(text)).into_owned()
}

/// One way a framework reads a query string: (name it looks the value up under, raw value).
struct View {
    name: &'static str,
    parse: fn(&str) -> Vec<(String, String)>,
}

const VIEWS: &[View] = &[
    View {
        name: "whatwg",
        parse: |q| pairs(q, &['&'], decode),
    },
    View {
        name: "brackets",
        parse: |q| pairs(q, &['&'], bracket_base),
    },
    View {
        name: "php",
        parse: |q| pairs(q, &['&'], php_name),
    },
    View {
        name: "semicolon",
        parse: |q| pairs(q, &['&', ';'], decode),
    },
];

fn pairs(query: &str, separators: &[char], key: fn(&str) -> String) -> Vec<(String, String)> {
    query
        .split(separators)
        .map(|pair| {
            let (name, value) = split_pair(pair);
            (key(name), value.unwrap_or_default().to_owned())
        })
        .collect()
}

/// `name[...]` is the list/map parameter `name` (PHP, Rack, qs).
fn bracket_base(name: &str) -> String {
    let decoded = decode(name);
    match decoded.find('[') {
        Some(open) if open > 0 && decoded[open..].contains(']') => decoded[..open].to_owned(),
        _ => decoded,
    }
}

/// The `$_GET` key PHP registers for a raw name (`main/php_variables.c`,
/// `php_register_variable_ex`): the C string ends at NUL, leading spaces are skipped, ` ` and
/// `.` become `_` before the first `[`; `name[..]` is an array `name`, an unclosed `[` is `_`.
fn php_name(name: &str) -> String {
    let mut bytes = decode_bytes(name);
    if let Some(nul) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(nul);
    }
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    let mut key = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b' ' | b'.' => key.push(b'_'),
            b'[' if bytes[i + 1..].contains(&b']') => break,
            b'[' => {
                key.push(b'_');
                key.extend_from_slice(&bytes[i + 1..]);
                break;
            }
            _ => key.push(b),
        }
    }
    String::from_utf8_lossy(&key).into_owned()
}
