//! DPoP (RFC 9449): a token bound to a key (`cnf.jkt`) is good only with a fresh proof, signed by
//! that key, for this very request. The proof is a JWT in the `DPoP` header whose embedded public
//! key (`jwk`) is the one to verify it with — the token's `cnf.jkt` (its RFC 7638 thumbprint) is
//! what makes that key trustworthy. Signature checks are jsonwebtoken's.

use std::time::Duration;

use base64::Engine as _;
use http::request;
use jsonwebtoken::{decode, decode_header, jwk::Jwk, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::{
    replay::{ReplayError, ReplayStore},
    sha256, AuthFailure,
};

/// The scheme the request arrived with (`http` or `https`), for the proof's `htu`.
#[derive(Debug, Clone, Copy)]
pub struct RequestScheme(pub &'static str);

const PROOF_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::EdDSA,
];

/// Checks DPoP proofs for one provider; remembers proof ids to refuse replays.
#[derive(Debug)]
pub struct DpopVerifier {
    max_age: u64,
    leeway: u64,
    replay: ReplayStore,
}

fn invalid(reason: &'static str) -> AuthFailure {
    AuthFailure::Invalid(reason)
}

impl DpopVerifier {
    /// `replay` remembers the ids of accepted proofs.
    pub fn new(max_age: Duration, leeway: u64, replay: ReplayStore) -> Self {
        Self {
            max_age: max_age.as_secs().max(1),
            leeway,
            replay,
        }
    }

    /// Verifies the request's proof for `access_token`; returns the proof key's thumbprint.
    pub async fn verify(
        &self,
        request: &request::Parts,
        access_token: &str,
        now: u64,
    ) -> Result<String, AuthFailure> {
        let mut values = request.headers.get_all("dpop").iter();
        let proof = match (values.next(), values.next()) {
            (Some(value), None) => value
                .to_str()
                .map_err(|_| invalid("malformed DPoP proof"))?,
            (None, _) => return Err(invalid("no DPoP proof")),
            (Some(_), Some(_)) => return Err(invalid("more than one DPoP proof")),
        };
        let header = decode_header(proof).map_err(|_| invalid("malformed DPoP proof"))?;
        if !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("dpop+jwt"))
        {
            return Err(invalid("DPoP proof has the wrong typ"));
        }
        if !PROOF_ALGORITHMS.contains(&header.alg) {
            return Err(invalid("DPoP proof algorithm not allowed"));
        }
        let jwk = header
            .jwk
            .as_ref()
            .ok_or(invalid("DPoP proof without a key"))?;
        if has_private_members(proof) {
            return Err(invalid("DPoP proof carries a private key"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| invalid("DPoP proof key unusable"))?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let claims = decode::<Map<String, Value>>(proof, &key, &validation)
            .map_err(|_| invalid("DPoP proof signature"))?
            .claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        if text("htm") != Some(request.method.as_str()) {
            return Err(invalid("DPoP proof for another method"));
        }
        if !text("htu").is_some_and(|htu| same_target(htu, request)) {
            return Err(invalid("DPoP proof for another URL"));
        }
        let iat = claims
            .get("iat")
            .and_then(Value::as_u64)
            .ok_or(invalid("DPoP proof without iat"))?;
        if iat > now + self.leeway || iat + self.max_age < now {
            return Err(invalid("stale DPoP proof"));
        }
        let expected_ath = b64(&sha256(access_token.as_bytes()));
        if text("ath") != Some(expected_ath.as_str()) {
            return Err(invalid("DPoP proof for another token"));
        }
        self.replay
            .first_use(text("jti"), iat + self.max_age + self.leeway, now)
            .await
            .map_err(|error| match error {
                ReplayError::Unavailable => invalid("replay store unavailable"),
                _ => invalid("replayed DPoP proof"),
            })?;
        thumbprint(jwk).ok_or(invalid("DPoP proof key unusable"))
    }
}

/// The proof's header must hold a public key only.
fn has_private_members(proof: &str) -> bool {
    let Some(header) = proof.split('.').next() else {
        return true;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return true;
    };
    let Ok(header) = serde_json::from_slice::<Value>(&bytes) else {
        return true;
    };
    let Some(jwk) = header.get("jwk").and_then(Value::as_object) else {
        return true;
    };
    ["d", "p", "q", "dp", "dq", "qi", "k"]
        .iter()
        .any(|m| jwk.contains_key(*m))
}

/// `htu` names this request: same scheme, host, port and path (query and fragment ignored).
fn same_target(htu: &str, request: &request::Parts) -> bool {
    let Ok(htu) = htu.parse::<http::Uri>() else {
        return false;
    };
    let scheme = request
        .extensions
        .get::<RequestScheme>()
        .map_or("http", |s| s.0);
    let host = request
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(host) = host else { return false };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (request_host, request_port) = split_port(&host, default_port);
    let htu_scheme = htu.scheme_str().unwrap_or_default();
    htu_scheme.eq_ignore_ascii_case(scheme)
        && htu
            .host()
            .is_some_and(|h| h.eq_ignore_ascii_case(&request_host))
        && htu.port_u16().unwrap_or(default_port) == request_port
        && htu.path() == request.uri.path()
}

fn split_port(host: &str, default: u16) -> (String, u16) {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) if !name.contains(':') || name.starts_with('[') => (name.to_owned(), port),
            _ => (host.to_owned(), default),
        },
        _ => (host.to_owned(), default),
    }
}

/// RFC 7638 JWK thumbprint: SHA-256 of the required members in lexicographic order.
pub fn thumbprint(jwk: &Jwk) -> Option<String> {
    let value = serde_json::to_value(jwk).ok()?;
    let member = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
    let canonical = match member("kty")?.as_str() {
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            member("crv")?,
            member("x")?,
            member("y")?
        ),
        "RSA" => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            member("e")?,
            member("n")?
        ),
        "OKP" => format!(
            r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#,
            member("crv")?,
            member("x")?
        ),
        _ => return None,
    };
    Some(b64(&sha256(canonical.as_bytes())))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_the_rfc_7638_example() {
        // the RSA key of RFC 7638 §3.1
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        }))
        .unwrap();
        assert_eq!(
            thumbprint(&jwk).as_deref(),
            Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        );
    }
}
