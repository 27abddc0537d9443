//! `portcullis::proxy::head_has_framing_conflict`, the byte-wise scanner the connection wrapper
//! runs over request heads to refuse `Content-Length` + `Transfer-Encoding`.
//!
//! Input: the first byte picks a split point, the rest is the head.
//!
//! Properties:
//! - chunking never changes the verdict: two chunks split at the chosen point, three chunks, and
//!   one byte at a time all agree with the whole;
//! - the verdict equals a plain model of what `HeadScanner` documents: CR bytes are ignored
//!   everywhere (its column counts "only non-CR bytes"), empty lines before the request line are
//!   skipped (as httparse skips them), the head ends at the first blank line
//!   (`\n\n` once CRs are dropped), the request line is not a header line, and a header line
//!   counts when it starts with `content-length:` / `transfer-encoding:` in any case. In
//!   particular it is false when the head does not hold both names at line starts.
//! - a head that hyper parses with both headers is flagged even when empty lines precede the
//!   request line: httparse (under hyper) skips any number of `\r\n` / `\n` lines there, so the
//!   head the scanner must look at is what follows them.
//!
//! (F2 in docs/fuzzing.md, fixed; `PORTCULLIS_FUZZ_SKIP_KNOWN=1` still skips that last check.)

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::head_has_framing_conflict;

fuzz_target!(|data: &[u8]| {
    let Some((&split, head)) = data.split_first() else {
        return;
    };
    let whole = head_has_framing_conflict(&[head]);

    let at = split as usize % (head.len() + 1);
    let (a, b) = head.split_at(at);
    assert_eq!(
        head_has_framing_conflict(&[a, b]),
        whole,
        "split at {at} changes the verdict for {:?}",
        String::from_utf8_lossy(head)
    );
    let at2 = at + (head.len() - at) / 2;
    let (b1, b2) = b.split_at(at2 - at);
    assert_eq!(
        head_has_framing_conflict(&[a, b1, b2]),
        whole,
        "three chunks"
    );
    let bytes: Vec<&[u8]> = head.chunks(1).collect();
    assert_eq!(head_has_framing_conflict(&bytes), whole, "byte by byte");

    let expected = model(head);
    assert_eq!(
        whole,
        expected,
        "scanner says {whole}, model says {expected} for {:?}",
        String::from_utf8_lossy(head)
    );

    if !skip_known() {
        let rest = skip_empty_lines(head);
        if model(rest) {
            assert!(
                whole,
                "hyper parses a head with both framing headers after leading empty lines, the scanner misses it: {:?}",
                String::from_utf8_lossy(head)
            );
        }
    }
});

/// Both names at the start of a header line of the head (CRs dropped, first line excluded).
fn model(head: &[u8]) -> bool {
    let text: Vec<u8> = head
        .iter()
        .filter(|&&b| b != b'\r')
        .map(u8::to_ascii_lowercase)
        .collect();
    // empty lines before the request line do not start the head
    let start = text.iter().position(|&b| b != b'\n').unwrap_or(text.len());
    let text = &text[start..];
    let end = text
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(text.len(), |p| p + 1);
    let head = &text[..end];
    let at_line_start = |name: &[u8]| {
        head.windows(name.len() + 1)
            .any(|w| w[0] == b'\n' && &w[1..] == name)
    };
    at_line_start(b"content-length:") && at_line_start(b"transfer-encoding:")
}

/// What httparse does before the request line: skip `\r\n` and `\n` lines.
fn skip_empty_lines(mut head: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = head.strip_prefix(b"\r\n") {
            head = rest;
        } else if let Some(rest) = head.strip_prefix(b"\n") {
            head = rest;
        } else {
            return head;
        }
    }
}

fn skip_known() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("PORTCULLIS_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"))
}
