//! `portcullis::route::normalize_path` on arbitrary absolute UTF-8 paths.
//!
//! On `Ok` the output must be a normal path in the sense of `src/route/normalize.rs`:
//! - it starts with `/`, has no empty segment (`//`) and no `.` / `..` segment anywhere;
//! - it holds none of the rejected encodings (`%2F`, `%5C`, `%00`, either case) and no `\`;
//! - every `%` starts an escape of two upper-case hex digits that is *not* an unreserved character
//!   (those are decoded);
//! - characters outside ASCII are never produced by decoding (only unreserved ASCII is decoded),
//!   so each one in the output appears in the input;
//! - normalising it again gives it back unchanged (idempotent), and borrowed (recognised as
//!   already normal) when it holds no escape (any `%` takes the decoding path).
//!
//! On `Err` the reason must be present in the input.
//!
//! `PORTCULLIS_FUZZ_SKIP_KNOWN=1` skips inputs that hit an open finding (F1: non-ASCII paths), so
//! a campaign can look for other bugs until it is fixed.

#![no_main]

use std::borrow::Cow;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::route::{normalize_path, PathError};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if !raw.starts_with('/') {
        return;
    }
    if skip_known() && !raw.is_ascii() {
        // finding F1 (docs/fuzzing.md): non-ASCII characters are re-encoded byte by byte
        return;
    }
    match normalize_path(raw) {
        Ok(out) => {
            if let Cow::Borrowed(b) = &out {
                assert_eq!(*b, raw, "a borrowed result must be the input itself");
            }
            check_normal(raw, &out);
            let again = normalize_path(&out)
                .unwrap_or_else(|e| panic!("normalised {out:?} (from {raw:?}) is refused: {e}"));
            assert_eq!(
                again, out,
                "not idempotent: {raw:?} -> {out:?} -> {again:?}"
            );
            // the one-pass check leaves any `%` to the slow path, so only escape-free paths
            // are promised to come back borrowed
            if !out.contains('%') {
                assert!(
                    matches!(again, Cow::Borrowed(_)),
                    "normalised {out:?} (from {raw:?}) is not recognised as already normal"
                );
            }
        }
        Err(error) => check_reason(raw, error),
    }
});

fn check_normal(raw: &str, out: &str) {
    let ctx = || format!("input {raw:?} -> output {out:?}");
    assert!(out.starts_with('/'), "no leading `/`: {}", ctx());
    assert!(!out.contains("//"), "empty segment: {}", ctx());
    assert!(
        !out.contains("/./") && !out.contains("/../"),
        "dot segment: {}",
        ctx()
    );
    assert!(
        !out.ends_with("/.") && !out.ends_with("/.."),
        "trailing dot segment: {}",
        ctx()
    );
    assert!(!out.contains('\\'), "backslash: {}", ctx());
    let upper = out.to_ascii_uppercase();
    for bad in ["%2F", "%5C", "%00"] {
        assert!(!upper.contains(bad), "{bad} in output: {}", ctx());
    }
    // every escape that is left is well-formed, upper-case, and not an unreserved character
    let bytes = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        let hex = bytes
            .get(i + 1..i + 3)
            .unwrap_or_else(|| panic!("truncated escape: {}", ctx()));
        assert!(
            hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')),
            "escape not upper-case hex: {}",
            ctx()
        );
        let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
        assert!(
            !(value.is_ascii_alphanumeric() || b"-._~".contains(&value)),
            "unreserved character left encoded: {}",
            ctx()
        );
    }
    // decoding only ever yields unreserved ASCII: any other character comes from the input as is
    for c in out.chars().filter(|c| !c.is_ascii()) {
        assert!(
            raw.contains(c),
            "{c:?} (U+{:04X}) appears in the output but not in the input: {}",
            c as u32,
            ctx()
        );
    }
}

fn check_reason(raw: &str, error: PathError) {
    let lower = raw.to_ascii_lowercase();
    let present = match error {
        PathError::NotAbsolute => false, // the input starts with `/`
        PathError::EncodedSlash => lower.contains("%2f"),
        PathError::Backslash => raw.contains('\\') || lower.contains("%5c"),
        PathError::Nul => raw.contains('\0') || lower.contains("%00"),
        PathError::Semicolon => raw.contains(';'),
        PathError::BadEscape => {
            let bytes = raw.as_bytes();
            raw.match_indices('%').any(|(i, _)| {
                !bytes
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            })
        }
    };
    assert!(
        present,
        "{raw:?} refused with {error:?}, which it does not contain"
    );
}

fn skip_known() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("PORTCULLIS_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"))
}
