//! What counts as a secret name, for query parameters, form fields, JSON fields and header names
//! alike.
//!
//! A name is percent-decoded, then looked at two ways: lower-cased with everything but letters
//! and digits dropped (so `Access_Token`, `access-token`, `accessToken`, `access.token`,
//! `access_token[]` and `access%5Ftoken` are one name), which is secret when it contains one of
//! the stems below; and split into words (at non-alphanumerics and camelCase humps), any of
//! which may be one of the short exact names (`mfa_code`, `x-auth`, `key[0]`, `signingKey`).
//! Over-redaction is the safe side: a field named `tokenizer` is hidden too.

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
    squash(&percent_decode_lossy(name))
}

fn squash(decoded: &str) -> String {
    decoded
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The words of a decoded name (as slices, in their original case): runs of ASCII letters and
/// digits, split before an upper-case letter that follows a lower-case one. Everything else
/// (including every byte of a non-ASCII character) separates words.
fn words(decoded: &str) -> impl Iterator<Item = &str> {
    let bytes = decoded.as_bytes();
    let mut start = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        while i <= bytes.len() {
            let at = i;
            i += 1;
            let (ends_word, starts_next) = match bytes.get(at) {
                None => (true, at),
                Some(b) if !b.is_ascii_alphanumeric() => (true, at + 1),
                Some(b) => (
                    b.is_ascii_uppercase() && at > start && bytes[at - 1].is_ascii_lowercase(),
                    at,
                ),
            };
            if !ends_word {
                continue;
            }
            // only ASCII letters and digits lie between `start` and `at`
            let word = std::str::from_utf8(&bytes[start..at]).unwrap_or_default();
            start = starts_next;
            if !word.is_empty() {
                return Some(word);
            }
        }
        None
    })
}

/// Whether a name is secret: built in, or listed in `extra` (each already [`normalize`]d; they
/// match the whole name or one of its words). The name is judged whole and, as PHP reads names,
/// cut at its first NUL byte.
pub fn is_secret(name: &str, extra: &[String]) -> bool {
    // decoding allocates only when there is something to decode
    let decoded: std::borrow::Cow<'_, str> = if name.contains(['%', '+']) {
        percent_decode_lossy(name).into()
    } else {
        name.into()
    };
    let cut = decoded.split('\0').next().unwrap_or_default();
    judged_secret(&decoded, extra) || (cut.len() < decoded.len() && judged_secret(cut, extra))
}

fn judged_secret(decoded: &str, extra: &[String]) -> bool {
    let whole = squash(decoded);
    if STEMS.iter().any(|stem| whole.contains(stem))
        || EXACT.contains(&whole.as_str())
        || extra.contains(&whole)
    {
        return true;
    }
    words(decoded).any(|word| {
        EXACT.iter().any(|exact| word.eq_ignore_ascii_case(exact))
            || extra.iter().any(|e| word.eq_ignore_ascii_case(e))
    })
}

/// `a=1&token=x&b=2` with secret values replaced. Pairs are split at `&`. A pair whose name
/// (before its first `=`) is secret is redacted whole; otherwise, inside it, a `;` may start
/// another pair (some frameworks read `a=1;token=x` as two), and from a secret name on the rest of
/// the `&`-pair is redacted (others read `token=x;y` as one value).
pub fn redact_pairs(text: &str, extra: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, pair) in text.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        // the name as a framework that does not split at `;` reads it (all before the first
        // `=`): `token%00x;y=1` is `token` to PHP
        if let Some((name, _)) = pair.split_once('=') {
            if is_secret(name, extra) {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
                continue;
            }
        }
        let mut start = 0;
        loop {
            let end = pair[start..].find(';').map_or(pair.len(), |e| start + e);
            if let Some((name, _)) = pair[start..end].split_once('=') {
                if is_secret(name, extra) {
                    out.push_str(&pair[..start]);
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                    break;
                }
            }
            if end == pair.len() {
                out.push_str(pair);
                break;
            }
            start = end + 1;
        }
    }
    out
}

/// Percent-decoding for names (`+` is a space); malformed escapes stay as they are.
pub fn percent_decode_lossy(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // two hex digits exactly (`from_str_radix` alone would take `%+5`)
        let decoded = (bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit())
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
            "mfa_code",
            "verificationCode",
            "x-auth",
            "key[0]",
            "data[code]",
            "signing_key",
            "pinCode",
            "keY",
            "CODE",
            "keY%00%00pppp",
        ] {
            assert!(is_secret(name, &[]), "{name}");
        }
        assert!(!is_secret("oauth_state", &[]));
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
    fn words_split_at_separators_and_humps() {
        fn split(name: &str) -> Vec<&str> {
            words(name).collect()
        }
        assert_eq!(split("mfa_code"), ["mfa", "code"]);
        assert_eq!(split("signingKey"), ["signing", "Key"]);
        assert_eq!(split("key[0]"), ["key", "0"]);
        assert_eq!(split("é-pin"), ["pin"]);
        assert_eq!(split("__"), Vec::<&str>::new());
        assert_eq!(split("URLValue"), ["URLValue"]);
    }

    #[test]
    fn pairs_keep_their_shape() {
        assert_eq!(
            redact_pairs("a=1&token=x;b=2&flag&&c=", &[]),
            "a=1&token=[redacted]&flag&&c="
        );
        assert_eq!(
            redact_pairs("x=1;password=abc;def&y=2", &[]),
            "x=1;password=[redacted]&y=2"
        );
        assert_eq!(redact_pairs("é=ü;ö=1", &[]), "é=ü;ö=1");
        assert_eq!(redact_pairs("", &[]), "");
        assert_eq!(redact_pairs("sig=abc", &[]), "sig=[redacted]");
        // PHP reads this as `access_token` (the name ends at the NUL)
        assert_eq!(
            redact_pairs("access_token%00x;t=secret", &[]),
            "access_token%00x;t=[redacted]"
        );
    }
}
