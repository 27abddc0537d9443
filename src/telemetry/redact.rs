//! What counts as a secret name, for query parameters, form fields and JSON fields alike.
//!
//! Names are compared after percent-decoding, lower-casing and dropping everything but letters
//! and digits, so `Access_Token`, `access-token`, `accessToken`, `access.token`, `access_token[]`
//! and `access%5Ftoken` are one name. A name is secret when it contains one of the stems below,
//! or is one of the short exact names (too short to match inside other words). Over-redaction is
//! the safe side: a field named `tokenizer` is hidden too.

/// Secret when the normalised name contains one of these.
const STEMS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "credential",
    "cookie",
    "session",
    "authorization",
    "assertion",
    "codeverifier",
    "signature",
    "cardnumber",
    "cvv",
    "ssn",
];

/// Secret when the normalised name is exactly one of these.
const EXACT: &[&str] = &["key", "code", "sig", "otp", "pin", "auth", "jwt", "pwd"];

/// The placeholder a secret value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Letters and digits of the percent-decoded name, lower-cased.
pub fn normalize(name: &str) -> String {
    percent_decode_lossy(name)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether a name built in, or listed in `extra` (already normalised), is secret.
pub fn is_secret(name: &str, extra: &[String]) -> bool {
    let name = normalize(name);
    STEMS.iter().any(|stem| name.contains(stem))
        || EXACT.contains(&name.as_str())
        || extra.contains(&name)
}

/// `a=1&token=x;b=2` with secret values replaced; `&` and `;` both separate pairs.
pub fn redact_pairs(text: &str, extra: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let pair = &rest[..end];
        match pair.split_once('=') {
            Some((name, _)) if is_secret(name, extra) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
        if end == rest.len() {
            return out;
        }
        out.push_str(&rest[end..end + 1]);
        rest = &rest[end + 1..];
    }
}

/// Percent-decoding for names (`+` is a space); malformed escapes stay as they are.
pub fn percent_decode_lossy(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_secret_are_one_name() {
        for name in [
            "access_token",
            "Access-Token",
            "accessToken",
            "access.token",
            "access_token[]",
            "access%5Ftoken",
            "refreshToken",
            "client_secret",
            "newPassword",
            "current_password",
            "code_verifier",
            "client_assertion",
            "X-Api-Key",
            "key",
            "code",
            "PIN",
        ] {
            assert!(is_secret(name, &[]), "{name}");
        }
        for name in [
            "page",
            "user",
            "shipping",
            "keyboard_layout",
            "codec",
            "mapping",
        ] {
            assert!(!is_secret(name, &[]), "{name}");
        }
        assert!(is_secret("I-B-A-N", &["iban".into()]));
    }

    #[test]
    fn pairs_keep_their_shape() {
        assert_eq!(
            redact_pairs("a=1&token=x;b=2&flag&&c=", &[]),
            "a=1&token=[redacted];b=2&flag&&c="
        );
        assert_eq!(redact_pairs("", &[]), "");
        assert_eq!(redact_pairs("sig=abc", &[]), "sig=[redacted]");
    }
}
