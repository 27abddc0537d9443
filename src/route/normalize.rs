//! Path normalisation before routing, so that a policy written for `/admin` cannot be walked around
//! with `/x/../admin`, `/%61dmin`, `//admin` or `/admin/.`.
//!
//! Rules (RFC 3986 §6.2.2 plus the rejections a gateway needs):
//! - percent-encoded *unreserved* characters (`A-Z a-z 0-9 - . _ ~`) are decoded; other escapes are
//!   kept, with upper-case hex;
//! - an encoded `/` (`%2F`), any `\` (raw or `%5C`), NUL (`%00`) and a raw `;` (path parameters,
//!   which servlet containers strip before resolving `..`) are rejected: backends disagree on what
//!   they mean, which is exactly what path-confusion attacks exploit;
//! - empty segments (`//`) collapse, `.` segments drop, `..` removes the previous segment (never
//!   climbing above the root);
//! - a trailing slash is kept.
//!
//! The normalised path is also what the upstream receives, so the backend sees the path the policy saw.

use std::borrow::Cow;

/// Why a path was refused (the client gets 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with `/`")]
    NotAbsolute,
    #[error("path contains an encoded `/`")]
    EncodedSlash,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path contains NUL")]
    Nul,
    #[error("path contains an invalid percent-encoding")]
    BadEscape,
    #[error("path contains `;`")]
    Semicolon,
}

/// Normalises a request path (without the query). Borrows when the path is already normal.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_already_normal(bytes) {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(bytes)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// The common case costs one pass: no escapes, no backslash, no empty or dot segments.
fn is_already_normal(bytes: &[u8]) -> bool {
    let mut previous_slash = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' | b';' | 0 => return false,
            b'/' => {
                if previous_slash {
                    return false;
                }
                previous_slash = true;
            }
            b'.' if previous_slash => {
                // `/.` or `/..` followed by `/` or the end is a dot segment
                let rest = &bytes[i..];
                let dots = rest.iter().take_while(|&&c| c == b'.').count();
                if dots <= 2 && rest.get(dots).is_none_or(|&c| c == b'/') {
                    return false;
                }
                previous_slash = false;
            }
            _ => previous_slash = false,
        }
    }
    true
}

fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    // bytes, not chars: a raw non-ASCII (UTF-8) byte is copied as it is, never re-encoded
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            // path parameters (`/..;/admin`, `/admin;x`): servlet containers strip them before
            // resolving dot segments, so they would see a different path than the gateway routed
            b';' => return Err(PathError::Semicolon),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|&c| hex_value(c));
                let lo = bytes.get(i + 2).and_then(|&c| hex_value(c));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                let decoded = hi << 4 | lo;
                match decoded {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0 => return Err(PathError::Nul),
                    c if is_unreserved(c) => out.push(c),
                    c => out.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[(c >> 4) as usize],
                        HEX_UPPER[(c & 0xf) as usize],
                    ]),
                }
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    // only ASCII was added or replaced, so the input's UTF-8 stays intact
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::with_capacity(8);
    let mut trailing_slash = path.ends_with('/');
    for segment in path.split('/') {
        match segment {
            "" => {}
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            other => {
                segments.push(other);
                trailing_slash = false;
            }
        }
    }
    if path.ends_with('/') {
        trailing_slash = true;
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> Result<String, PathError> {
        normalize_path(path).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for path in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/users/42/orders"] {
            assert!(
                matches!(normalize_path(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn traversal_shapes_collapse_to_the_real_target() {
        assert_eq!(norm("/x/../admin").unwrap(), "/admin");
        assert_eq!(norm("//admin").unwrap(), "/admin");
        assert_eq!(norm("/%61dmin").unwrap(), "/admin");
        assert_eq!(norm("/./admin/.").unwrap(), "/admin/");
        assert_eq!(norm("/%2e%2e/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(norm("/a/b/../../../admin").unwrap(), "/admin");
        assert_eq!(norm("/tenants/a/../b/x").unwrap(), "/tenants/b/x");
        assert_eq!(norm("/a/..").unwrap(), "/");
    }

    #[test]
    fn reserved_escapes_stay_encoded_with_upper_case_hex() {
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert_eq!(norm("/a%3fb").unwrap(), "/a%3Fb");
    }

    #[test]
    fn dangerous_encodings_are_rejected() {
        assert_eq!(norm("/admin%2fsecret"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/admin%2Fsecret"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/admin\\secret"), Err(PathError::Backslash));
        assert_eq!(norm("/admin%5csecret"), Err(PathError::Backslash));
        assert_eq!(norm("/admin%00"), Err(PathError::Nul));
        assert_eq!(norm("/bad%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/bad%2"), Err(PathError::BadEscape));
        assert_eq!(norm("admin"), Err(PathError::NotAbsolute));
        assert_eq!(norm("/public/..;/admin/secret"), Err(PathError::Semicolon));
        assert_eq!(norm("/admin;x/secret"), Err(PathError::Semicolon));
    }

    #[test]
    fn non_ascii_paths_keep_their_characters() {
        // found by fuzzing: bytes above 0x7F were re-encoded one by one as Latin-1
        assert_eq!(norm("//é").unwrap(), "/é");
        assert_eq!(norm("/café/%7euser").unwrap(), "/café/~user");
        let once = norm("/café/%20").unwrap();
        assert_eq!(once, "/café/%20");
        assert_eq!(norm(&once).unwrap(), once);
        assert_eq!(norm("/a\0b"), Err(PathError::Nul));
    }

    #[test]
    fn normalisation_is_idempotent() {
        for path in [
            "/x/../admin",
            "//a//b/",
            "/%61/./%2e%2e/c",
            "/a%20b/../c%7e",
        ] {
            let once = norm(path).unwrap();
            assert_eq!(norm(&once).unwrap(), once, "{path}");
        }
    }
}
