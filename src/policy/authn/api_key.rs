//! API keys: looked up by the SHA-256 of the presented key and confirmed with a constant-time
//! comparison. Only hashes are stored (in the config or an environment variable), which is safe
//! for the high-entropy keys `portcullis key generate` makes (SHA-256 is not a password hash:
//! do not use it for short, human-chosen secrets).

use std::{collections::HashMap, path::Path, sync::Arc};

use base64::Engine as _;
use http::{request, HeaderName};
use subtle::ConstantTimeEq;

use super::{
    query_param, remove_query_param, sha256, unix_now, AuthFailure, Identity, IdentityHeaderNames,
};
use crate::config::model::{ApiKeyConfig, ApiKeySetConfig};

struct Entry {
    digest: [u8; 32],
    expires_at: Option<u64>,
    identity: Arc<Identity>,
}

/// A compiled set of API keys.
pub struct ApiKeySet {
    pub name: Arc<str>,
    header: HeaderName,
    query: Option<String>,
    by_digest: HashMap<[u8; 32], Entry>,
}

impl std::fmt::Debug for ApiKeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeySet")
            .field("name", &self.name)
            .field("keys", &self.by_digest.len())
            .finish()
    }
}

/// Where a key came from, so a config error can point at it.
#[derive(Clone, Copy)]
enum KeySource<'a> {
    Inline,
    File(&'a Path),
}

/// A problem with an API-key set; `field` is relative to the set (`header`, `keys[2]`,
/// `keys_file`) and the message names the keys file when the key came from one.
#[derive(Debug)]
pub struct ApiKeySetError {
    pub field: String,
    pub message: String,
}

impl ApiKeySet {
    /// Compiles the inline keys and those of `keys_file` (resolved against `base_dir`).
    pub fn from_config(
        config: &ApiKeySetConfig,
        base_dir: &Path,
        identity_names: &IdentityHeaderNames,
    ) -> Result<Self, ApiKeySetError> {
        let header =
            HeaderName::from_bytes(config.header.as_bytes()).map_err(|_| ApiKeySetError {
                field: "header".to_owned(),
                message: format!("`{}` is not a valid header name", config.header),
            })?;
        let file = match &config.keys_file {
            None => None,
            Some(path) => {
                let path = base_dir.join(path);
                let keys = load_keys_file(&path)?;
                Some((path, keys))
            }
        };
        let from_file = file.iter().flat_map(|(path, keys)| {
            keys.iter()
                .enumerate()
                .map(move |(i, key)| (KeySource::File(path), i, key))
        });
        let keys = config
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| (KeySource::Inline, i, key))
            .chain(from_file);
        let name: Arc<str> = config.name.as_str().into();
        let mut by_digest = HashMap::new();
        for (source, i, key) in keys {
            let fail = |message: String| match source {
                KeySource::Inline => ApiKeySetError {
                    field: format!("keys[{i}]"),
                    message,
                },
                KeySource::File(path) => ApiKeySetError {
                    field: "keys_file".to_owned(),
                    message: format!("{}: key {i} (id `{}`): {message}", path.display(), key.id),
                },
            };
            let digest = parse_hex_digest(&key.sha256).ok_or_else(|| {
                fail("`sha256` must be 64 hex digits (see `portcullis key generate`)".to_owned())
            })?;
            let expires_at = match &key.expires {
                None => None,
                Some(text) => Some(parse_rfc3339_utc(text).ok_or_else(|| {
                    fail(format!(
                        "`{text}` is not an RFC 3339 UTC time such as 2027-01-31T00:00:00Z"
                    ))
                })?),
            };
            let roles: Vec<Box<str>> = key.roles.iter().map(|r| r.as_str().into()).collect();
            let headers =
                identity_names.headers_for("api_key", &name, &key.id, None, &roles, Vec::new());
            let identity = Arc::new(Identity {
                method: "api_key",
                provider: name.clone(),
                subject: key.id.as_str().into(),
                issuer: None,
                roles,
                scopes: key.scopes.iter().map(|s| s.as_str().into()).collect(),
                claims: identity_names.retain_claims(&key.claims.clone().into_iter().collect()),
                headers,
                token_id: None,
                certificate_thumbprint: None,
                dpop_key: None,
                expires_at,
            });
            if by_digest
                .insert(
                    digest,
                    Entry {
                        digest,
                        expires_at,
                        identity,
                    },
                )
                .is_some()
            {
                return Err(fail("the same key appears twice".to_owned()));
            }
        }
        Ok(Self {
            name,
            header,
            query: config.query.clone(),
            by_digest,
        })
    }

    /// The header the key is read from.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    pub fn authenticate(&self, request: &mut request::Parts) -> Result<Arc<Identity>, AuthFailure> {
        let mut values = request.headers.get_all(&self.header).iter();
        let presented = match (values.next(), values.next()) {
            (Some(_), Some(_)) => return Err(AuthFailure::Invalid("more than one key")),
            (Some(value), None) => value.as_bytes().to_vec(),
            (None, _) => match self.query.as_deref().and_then(|q| query_param(request, q)) {
                Some(value) if !value.is_empty() => value.as_bytes().to_vec(),
                _ => return Err(AuthFailure::Missing),
            },
        };
        let digest = sha256(&presented);
        let entry = self
            .by_digest
            .get(&digest)
            .ok_or(AuthFailure::Invalid("unknown key"))?;
        // the lookup was by digest already; confirm in constant time all the same
        if !bool::from(entry.digest.ct_eq(&digest)) {
            return Err(AuthFailure::Invalid("unknown key"));
        }
        if entry.expires_at.is_some_and(|at| unix_now() >= at) {
            return Err(AuthFailure::Invalid("expired key"));
        }
        self.scrub(request);
        Ok(entry.identity.clone())
    }

    /// Removes the key from the request: a key never travels further, whichever method of the
    /// route accepted the request.
    pub fn scrub(&self, request: &mut request::Parts) {
        request.headers.remove(&self.header);
        if let Some(query) = &self.query {
            remove_query_param(request, query);
        }
    }
}

/// A new random API key (256 bits, base64url with a `pck_` prefix) and its SHA-256 in hex.
pub fn generate_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
    let key = format!(
        "pck_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let digest = sha256(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    (key, hex)
}

/// Reads a keys file: a YAML list of keys in the same shape as the inline `keys`.
fn load_keys_file(path: &Path) -> Result<Vec<ApiKeyConfig>, ApiKeySetError> {
    let fail = |message: String| ApiKeySetError {
        field: "keys_file".to_owned(),
        message: format!("{}: {message}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    // an empty file is more likely a half-written one than a decision to drop every key
    if text.trim().is_empty() {
        return Err(fail(
            "the file is empty (write `[]` for no keys)".to_owned(),
        ));
    }
    serde_yaml::from_str(&text).map_err(|e| fail(e.to_string()))
}

fn parse_hex_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `YYYY-MM-DDTHH:MM:SSZ` to Unix seconds.
fn parse_rfc3339_utc(text: &str) -> Option<u64> {
    let text = text
        .trim()
        .strip_suffix('Z')
        .or_else(|| text.trim().strip_suffix("+00:00"))?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let mut time = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (time.next()??, time.next()??, time.next()??);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_unix_seconds() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc("2027-01-31T00:00:00Z"),
            Some(1_801_353_600)
        );
        assert_eq!(
            parse_rfc3339_utc("2000-03-01T12:30:15+00:00"),
            Some(951_913_815)
        );
        assert_eq!(parse_rfc3339_utc("2027-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2027-01-31"), None);
    }

    #[test]
    fn generated_keys_hash_to_what_is_printed() {
        let (key, hex) = generate_key();
        assert!(key.starts_with("pck_") && key.len() > 40);
        assert_eq!(parse_hex_digest(&hex), Some(sha256(key.as_bytes())));
        assert_ne!(generate_key().0, key);
    }
}
