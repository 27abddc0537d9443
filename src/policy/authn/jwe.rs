//! Encrypted JWTs (JWE, RFC 7516): a compact JWE is decrypted with one of the gateway's private
//! keys, and the nested signed JWT inside it is then verified like any other. Decryption is
//! josekit's (OpenSSL); nothing here implements a cipher.
//!
//! Accepted: key management `RSA-OAEP-256` (RSA keys), `ECDH-ES` and `ECDH-ES+A256KW` (P-256 /
//! P-384 keys); content encryption `A256GCM` or `A128GCM`. Everything else (`RSA1_5`, `RSA-OAEP`
//! with SHA-1, `dir`, password-based, CBC modes) is refused.

use std::path::Path;

use josekit::jwe::{self, JweDecrypter, JweHeader};

/// Why a decryption key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JweKeyError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("`{path}` is not a PKCS#8 PEM RSA or EC (P-256/P-384) private key")]
    Unusable { path: String },
}

/// The gateway's JWE decryption keys for one provider.
#[derive(Debug, Default)]
pub struct JweKeys {
    rsa: Vec<Box<dyn JweDecrypter>>,
    ecdh: Vec<Box<dyn JweDecrypter>>,
    ecdh_kw: Vec<Box<dyn JweDecrypter>>,
}

impl JweKeys {
    pub fn load(paths: &[std::path::PathBuf], base: &Path) -> Result<Self, JweKeyError> {
        let mut keys = Self::default();
        for path in paths {
            let full = base.join(path);
            let pem = std::fs::read(&full).map_err(|source| JweKeyError::Read {
                path: full.display().to_string(),
                source,
            })?;
            if let Ok(rsa) = jwe::RSA_OAEP_256.decrypter_from_pem(&pem) {
                keys.rsa.push(Box::new(rsa));
            } else if let (Ok(plain), Ok(wrapped)) = (
                jwe::ECDH_ES.decrypter_from_pem(&pem),
                jwe::ECDH_ES_A256KW.decrypter_from_pem(&pem),
            ) {
                keys.ecdh.push(Box::new(plain));
                keys.ecdh_kw.push(Box::new(wrapped));
            } else {
                return Err(JweKeyError::Unusable {
                    path: full.display().to_string(),
                });
            }
        }
        Ok(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.rsa.is_empty() && self.ecdh.is_empty()
    }

    /// Decrypts a compact JWE and returns its payload (the nested JWS), or `None` when no key
    /// opens it or its algorithms are not accepted.
    pub fn decrypt(&self, token: &str) -> Option<String> {
        let header = peek_header(token)?;
        let candidates = match header.algorithm()? {
            "RSA-OAEP-256" => &self.rsa,
            "ECDH-ES" => &self.ecdh,
            "ECDH-ES+A256KW" => &self.ecdh_kw,
            _ => return None,
        };
        if !matches!(header.content_encryption(), Some("A256GCM" | "A128GCM")) {
            return None;
        }
        candidates.iter().find_map(|key| {
            let (payload, _) = jwe::deserialize_compact(token, key.as_ref()).ok()?;
            String::from_utf8(payload).ok()
        })
    }
}

/// The protected header of a compact JWE, read without decrypting.
fn peek_header(token: &str) -> Option<JweHeader> {
    use base64::Engine as _;
    let first = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first)
        .ok()?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
    JweHeader::from_map(map).ok()
}

/// A compact JWE has five segments (a JWS three).
pub fn is_jwe(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 4
}
