//! Signed JWT (JWS) verification with `jsonwebtoken` (aws-lc-rs backend); no signature code of
//! our own.
//!
//! Order of checks: token present → cache (by SHA-256, within `exp`) → header parses, `alg` is
//! allowed, no `crit`, `typ` → a key that fits both `kid` and `alg` (refreshing a remote JWKS once,
//! rate-limited, for an unknown `kid`) → signature and `exp`/`nbf`/`iss`/`aud` → `iat` not in the
//! future, lifetime not above the maximum, required claims, a subject. `jwk`, `jku`, `x5u` and
//! `x5c` headers are ignored: keys come only from the provider's configuration.

use std::{path::Path, str::FromStr, sync::Arc};

use arc_swap::ArcSwap;
use http::{header, request, HeaderName, HeaderValue};
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, Validation};
use serde_json::{Map, Value};

use super::{
    cache::{sha256, VerifiedCache},
    claim_at,
    dpop::DpopVerifier,
    jwe::{is_jwe, JweKeys},
    jwks::{JwksRegistry, KeySet, RemoteJwks},
    query_param, remove_query_param,
    replay::{ReplayError, ReplayStore},
    unix_now, AuthFailure, Identity, IdentityHeaderNames,
};
use crate::{
    config::model::{JwtKeysConfig, JwtProviderConfig, StoreKind, TokenSourceConfig},
    store::RedisStore,
};

/// Why a provider could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("unknown algorithm `{0}` (one of RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512)")]
    UnknownAlgorithm(String),
    #[error(
        "HS* algorithms need `keys: {{secret: ...}}`, and a secret allows only HS* algorithms"
    )]
    SecretMismatch,
    #[error("the secret must be at least 32 bytes")]
    ShortSecret,
    #[error("{0}")]
    Keys(#[from] super::KeyError),
    #[error("`{0}` is not a valid URL")]
    BadUrl(String),
    #[error("`{0}` is not a valid header name")]
    BadHeader(String),
    #[error("{0}")]
    DecryptionKey(#[from] super::jwe::JweKeyError),
    #[error("`replay_store: redis` needs the top-level `redis` section")]
    NoSharedStore,
}

enum Keys {
    Static(ArcSwap<KeySet>),
    Remote(Arc<RemoteJwks>),
}

/// A compiled JWT provider.
pub struct JwtProvider {
    pub name: Arc<str>,
    keys: Keys,
    /// One prepared validation per allowed algorithm.
    validations: Vec<(Algorithm, Validation)>,
    leeway: u64,
    max_lifetime: Option<u64>,
    typ: Option<String>,
    required_claims: Vec<(String, Value)>,
    source: TokenSourceConfig,
    forward_token: bool,
    claim_headers: Vec<(String, HeaderName)>,
    roles_claim: Option<String>,
    cache: VerifiedCache,
    replay: Option<ReplayStore>,
    dpop: Option<DpopVerifier>,
    dpop_required: bool,
    jwe: JweKeys,
    identity_names: Arc<IdentityHeaderNames>,
}

impl std::fmt::Debug for JwtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtProvider")
            .field("name", &self.name)
            .finish()
    }
}

impl JwtProvider {
    pub fn from_config(
        config: &JwtProviderConfig,
        base_dir: &Path,
        identity_names: Arc<IdentityHeaderNames>,
        remote_sets: &JwksRegistry,
        shared_store: Option<&Arc<RedisStore>>,
    ) -> Result<Self, JwtError> {
        let algorithms = config
            .algorithms
            .iter()
            .map(|a| Algorithm::from_str(a).map_err(|_| JwtError::UnknownAlgorithm(a.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let hmac =
            |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let keys = match &config.keys {
            JwtKeysConfig::Secret(secret) => {
                if !algorithms.iter().all(hmac) {
                    return Err(JwtError::SecretMismatch);
                }
                if secret.len() < 32 {
                    return Err(JwtError::ShortSecret);
                }
                Keys::Static(ArcSwap::from_pointee(KeySet::from_secret(
                    secret.as_bytes(),
                )))
            }
            other => {
                if algorithms.iter().any(hmac) {
                    return Err(JwtError::SecretMismatch);
                }
                match other {
                    JwtKeysConfig::JwksFile(path) => {
                        let bytes = read_key_file(&base_dir.join(path))?;
                        Keys::Static(ArcSwap::from_pointee(KeySet::from_jwks(&bytes)?))
                    }
                    JwtKeysConfig::PublicKeyPem(path) => {
                        let bytes = read_key_file(&base_dir.join(path))?;
                        Keys::Static(ArcSwap::from_pointee(KeySet::from_pem(&bytes)?))
                    }
                    JwtKeysConfig::JwksUrl {
                        url,
                        refresh_interval,
                        min_refresh_interval,
                    } => {
                        let uri: http::Uri =
                            url.parse().map_err(|_| JwtError::BadUrl(url.clone()))?;
                        Keys::Remote(remote_sets.get_or_create(
                            &uri,
                            refresh_interval.0,
                            min_refresh_interval.0,
                        )?)
                    }
                    JwtKeysConfig::OidcIssuer {
                        issuer,
                        refresh_interval,
                        min_refresh_interval,
                    } => Keys::Remote(remote_sets.get_or_discover(
                        issuer,
                        refresh_interval.0,
                        min_refresh_interval.0,
                    )?),
                    JwtKeysConfig::Secret(_) => unreachable!("handled above"),
                }
            }
        };
        let leeway = config.leeway.0.as_secs();
        let validations = algorithms
            .iter()
            .map(|&alg| {
                let mut validation = Validation::new(alg);
                validation.leeway = leeway;
                validation.validate_exp = true;
                validation.validate_nbf = true;
                let mut required: Vec<&str> = Vec::new();
                if config.require_exp {
                    required.push("exp");
                }
                // with discovery, tokens must come from the discovered issuer unless told otherwise
                let discovered = match &config.keys {
                    JwtKeysConfig::OidcIssuer { issuer, .. } => Some(issuer),
                    _ => None,
                };
                if let Some(issuer) = config.issuer.as_ref().or(discovered) {
                    validation.set_issuer(&[issuer]);
                    required.push("iss");
                }
                if config.audiences.is_empty() {
                    validation.validate_aud = false;
                } else {
                    validation.set_audience(&config.audiences);
                    required.push("aud");
                }
                validation.set_required_spec_claims(&required);
                (alg, validation)
            })
            .collect();
        let claim_headers = config
            .claim_headers
            .iter()
            .map(|(claim, name)| {
                HeaderName::from_bytes(name.as_bytes())
                    .map(|h| (claim.clone(), h))
                    .map_err(|_| JwtError::BadHeader(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // where used token ids and DPoP proof ids are remembered
        let shared = match config.replay_store {
            StoreKind::Memory => None,
            StoreKind::Redis => Some(shared_store.ok_or(JwtError::NoSharedStore)?.clone()),
        };
        Ok(Self {
            name: config.name.as_str().into(),
            keys,
            validations,
            leeway,
            max_lifetime: config.max_lifetime.map(|d| d.0.as_secs()),
            typ: config.typ.clone(),
            required_claims: config
                .required_claims
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            source: config.token_source.clone(),
            forward_token: config.forward_token,
            claim_headers,
            roles_claim: config.roles_claim.clone(),
            cache: VerifiedCache::new(config.cache_size),
            replay: config.one_time_use.then(|| {
                ReplayStore::new(
                    shared.clone(),
                    "jti",
                    &config.name,
                    config.cache_size.max(100_000),
                )
            }),
            dpop: config.dpop.as_ref().map(|d| {
                let proofs = ReplayStore::new(shared.clone(), "dpop", &config.name, 100_000);
                DpopVerifier::new(d.max_age.0, leeway, proofs)
            }),
            dpop_required: config.dpop.as_ref().is_some_and(|d| d.required),
            jwe: JweKeys::load(&config.decryption_keys, base_dir)?,
            identity_names,
        })
    }

    /// The remote key set, if this provider has one (for the background refresher).
    pub fn remote(&self) -> Option<&Arc<RemoteJwks>> {
        match &self.keys {
            Keys::Remote(remote) => Some(remote),
            Keys::Static(_) => None,
        }
    }

    /// Finds the token, verifies it, and then keeps it from (or lets it reach) the upstream.
    pub async fn authenticate(
        &self,
        request: &mut request::Parts,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let token = self.extract(request)?;
        let token_text = std::str::from_utf8(token.as_bytes())
            .map_err(|_| AuthFailure::Invalid("malformed token"))?
            .trim();
        let mut dpop_scheme = false;
        let token_text = match &self.source {
            TokenSourceConfig::Bearer => {
                let (scheme_is_dpop, token) =
                    strip_bearer(token_text, self.dpop.is_some()).ok_or(AuthFailure::Missing)?;
                dpop_scheme = scheme_is_dpop;
                token
            }
            TokenSourceConfig::Cookie(name) => {
                cookie_value(token_text, name).ok_or(AuthFailure::Missing)?
            }
            _ => token_text,
        };
        let identity = self.verify(token_text).await?;
        super::check_binding(&identity, request)?;
        match (&self.dpop, &identity.dpop_key) {
            (Some(dpop), Some(bound)) => {
                // RFC 9449: a DPoP-bound token comes with the DPoP scheme and a proof by its key
                if !dpop_scheme {
                    return Err(AuthFailure::Invalid(
                        "DPoP-bound token sent as a bearer token",
                    ));
                }
                let proved = dpop.verify(request, token_text, unix_now()).await?;
                if proved != **bound {
                    return Err(AuthFailure::Invalid("DPoP proof by another key"));
                }
            }
            (Some(_), None) if dpop_scheme || self.dpop_required => {
                return Err(AuthFailure::Invalid("token is not DPoP-bound"));
            }
            _ => {}
        }
        if let Some(replay) = &self.replay {
            // every use counts, also when the verification itself came from the cache
            // remembered for as long as the token still verifies: exp plus the leeway
            let expires_at = identity
                .expires_at
                .map_or(u64::MAX, |exp| exp.saturating_add(self.leeway));
            replay
                .first_use(identity.token_id.as_deref(), expires_at, unix_now())
                .await
                .map_err(|error| {
                    AuthFailure::Invalid(match error {
                        ReplayError::Replayed => "replayed token",
                        ReplayError::MissingJti => "no jti for a one-time token",
                        ReplayError::Full => "replay memory full",
                        ReplayError::Unavailable => "replay store unavailable",
                    })
                })?;
        }
        if let TokenSourceConfig::Query(name) = &self.source {
            // a token in a URL must not travel on, nor reach logs
            remove_query_param(request, name);
        } else if !self.forward_token {
            match &self.source {
                TokenSourceConfig::Bearer => {
                    request.headers.remove(header::AUTHORIZATION);
                }
                TokenSourceConfig::Header(name) => {
                    request.headers.remove(name.as_str());
                }
                TokenSourceConfig::Cookie(name) => remove_cookie(request, name),
                TokenSourceConfig::Query(_) => {}
            }
        }
        Ok(identity)
    }

    /// Removes credentials of this provider that must not reach the upstream, after another
    /// method of the route accepted the request: a token in the URL, or a token not to forward.
    pub fn scrub(&self, request: &mut request::Parts) {
        match &self.source {
            TokenSourceConfig::Query(name) => remove_query_param(request, name),
            TokenSourceConfig::Bearer if !self.forward_token => {
                request.headers.remove(header::AUTHORIZATION);
            }
            TokenSourceConfig::Header(name) if !self.forward_token => {
                request.headers.remove(name.as_str());
            }
            TokenSourceConfig::Cookie(name) if !self.forward_token => remove_cookie(request, name),
            _ => {}
        }
    }

    /// The raw credential carrier (header value or query value) for this provider's source.
    fn extract(&self, request: &request::Parts) -> Result<HeaderValue, AuthFailure> {
        let single = |name: &str| {
            let mut values = request.headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => Err(AuthFailure::Missing),
                (Some(value), None) => Ok(value.clone()),
                // two credentials: ambiguous, refuse rather than pick one
                (Some(_), Some(_)) => Err(AuthFailure::Invalid("more than one credential")),
            }
        };
        match &self.source {
            TokenSourceConfig::Bearer => single(header::AUTHORIZATION.as_str()),
            TokenSourceConfig::Header(name) => single(name),
            TokenSourceConfig::Cookie(_) => {
                // all Cookie headers, joined, searched later by name
                let joined: Vec<&str> = request
                    .headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if joined.is_empty() {
                    return Err(AuthFailure::Missing);
                }
                HeaderValue::from_str(&joined.join("; "))
                    .map_err(|_| AuthFailure::Invalid("malformed cookie"))
            }
            TokenSourceConfig::Query(name) => query_param(request, name)
                .filter(|v| !v.is_empty())
                .ok_or(AuthFailure::Missing)
                .and_then(|v| {
                    HeaderValue::from_str(v).map_err(|_| AuthFailure::Invalid("malformed token"))
                }),
        }
    }

    /// Verifies a compact JWS, or decrypts a compact JWE and verifies the JWS inside it, and
    /// returns the identity it carries.
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, AuthFailure> {
        if !is_jwe(token) {
            return self.verify_signed(token).await;
        }
        if self.jwe.is_empty() {
            return Err(AuthFailure::Invalid("encrypted token not accepted"));
        }
        let now = unix_now();
        let digest = sha256(token.as_bytes());
        let key_version = self.key_version();
        if let Some(identity) = self.cache.get(&digest, now, key_version) {
            return Ok(identity);
        }
        // decryption is a private-key operation: its result is cached like a verification
        let inner = self
            .jwe
            .decrypt(token)
            .ok_or(AuthFailure::Invalid("decryption failed"))?;
        if is_jwe(&inner) {
            return Err(AuthFailure::Invalid("nested encryption"));
        }
        let identity = self.verify_signed(&inner).await?;
        let valid_until = identity.expires_at.unwrap_or(now + 60).min(now + 86_400);
        self.cache.insert(
            digest,
            valid_until,
            self.key_version(),
            identity.clone(),
            now,
        );
        Ok(identity)
    }

    fn key_version(&self) -> u64 {
        match &self.keys {
            Keys::Static(_) => 0,
            Keys::Remote(remote) => remote.key_version(),
        }
    }

    /// Verifies a compact JWS and returns the identity it carries.
    async fn verify_signed(&self, token: &str) -> Result<Arc<Identity>, AuthFailure> {
        let now = unix_now();
        let digest = sha256(token.as_bytes());
        let key_version = match &self.keys {
            Keys::Static(_) => 0,
            Keys::Remote(remote) => remote.key_version(),
        };
        if let Some(identity) = self.cache.get(&digest, now, key_version) {
            return Ok(identity);
        }
        let header = decode_header(token).map_err(|_| AuthFailure::Invalid("malformed token"))?;
        let Some((alg, validation)) = self.validations.iter().find(|(alg, _)| *alg == header.alg)
        else {
            return Err(AuthFailure::Invalid("algorithm not allowed"));
        };
        if header.crit.is_some() {
            // no JWS extensions are implemented, so any critical one must be refused (RFC 7515 §4.1.11)
            return Err(AuthFailure::Invalid("unsupported critical header"));
        }
        if let Some(typ) = &self.typ {
            if !header
                .typ
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(typ))
            {
                return Err(AuthFailure::Invalid("wrong typ"));
            }
        }
        let kid = header.kid.as_deref();
        let mut outcome = self.try_keys(token, kid, *alg, validation);
        if matches!(outcome, Err(AuthFailure::Invalid("no matching key"))) {
            if let (Keys::Remote(remote), Some(kid)) = (&self.keys, kid) {
                if !remote.current().knows(kid) && remote.refresh_if_allowed().await {
                    outcome = self.try_keys(token, Some(kid), *alg, validation);
                }
            }
        }
        let claims = outcome?;
        self.check_claims(&claims, now)?;
        let identity = Arc::new(self.identity(&claims)?);
        // never past `exp` (a fractional `exp` counts down to its whole second); tokens allowed
        // without `exp` are remembered for a minute at most
        let valid_until = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_u64()
                    .or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            })
            .unwrap_or(now + 60)
            .min(now + 86_400);
        // the key set may have been refreshed while verifying: record the current version
        let key_version = match &self.keys {
            Keys::Static(_) => 0,
            Keys::Remote(remote) => remote.key_version(),
        };
        self.cache
            .insert(digest, valid_until, key_version, identity.clone(), now);
        Ok(identity)
    }

    fn try_keys(
        &self,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
        validation: &Validation,
    ) -> Result<Map<String, Value>, AuthFailure> {
        let guard;
        let keys: &KeySet = match &self.keys {
            Keys::Static(keys) => {
                guard = keys.load();
                &guard
            }
            Keys::Remote(remote) => {
                guard = remote.current();
                &guard
            }
        };
        let mut failure = AuthFailure::Invalid("no matching key");
        for candidate in keys.candidates(kid, alg) {
            match decode::<Map<String, Value>>(token, &candidate.key, validation) {
                Ok(data) => return Ok(data.claims),
                Err(error) => {
                    failure = AuthFailure::Invalid(reason(error.kind()));
                    // a claim failure is final; a signature failure may still verify with another key
                    if !matches!(error.kind(), ErrorKind::InvalidSignature) {
                        return Err(failure);
                    }
                }
            }
        }
        Err(failure)
    }

    fn check_claims(&self, claims: &Map<String, Value>, now: u64) -> Result<(), AuthFailure> {
        let iat = claims.get("iat").and_then(seconds);
        if iat.is_some_and(|iat| iat > now + self.leeway) {
            return Err(AuthFailure::Invalid("issued in the future"));
        }
        if let Some(max) = self.max_lifetime {
            let exp = claims.get("exp").and_then(seconds);
            match (iat, exp) {
                (Some(iat), Some(exp)) if exp.saturating_sub(iat) <= max => {}
                _ => return Err(AuthFailure::Invalid("lifetime too long or unknown")),
            }
        }
        for (name, expected) in &self.required_claims {
            if claims.get(name) != Some(expected) {
                return Err(AuthFailure::Invalid("required claim mismatch"));
            }
        }
        Ok(())
    }

    /// The identity unverified claims would give (for `portcullis explain --claims`; the request
    /// path only ever builds identities from verified tokens).
    pub fn identity_from_claims(
        &self,
        claims: &Map<String, Value>,
    ) -> Result<Identity, AuthFailure> {
        self.identity(claims)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthFailure> {
        let confirmation = super::confirmation(claims.get("cnf"), self.dpop.is_some())?;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(AuthFailure::Invalid("no subject"))?;
        let issuer = claims.get("iss").and_then(Value::as_str);
        let roles = super::names_in(
            self.roles_claim
                .as_deref()
                .and_then(|path| claim_at(claims, path)),
        );
        let extra = self
            .claim_headers
            .iter()
            .filter_map(|(claim, name)| {
                let text = match claim_at(claims, claim)? {
                    Value::String(s) => s.clone(),
                    other @ (Value::Number(_) | Value::Bool(_)) => other.to_string(),
                    _ => return None,
                };
                Some((name.clone(), HeaderValue::from_str(&text).ok()?))
            })
            .collect();
        let headers = self
            .identity_names
            .headers_for("jwt", &self.name, subject, issuer, &roles, extra);
        Ok(Identity {
            method: "jwt",
            provider: self.name.clone(),
            subject: subject.into(),
            issuer: issuer.map(Into::into),
            roles,
            scopes: super::scopes_in(claims),
            claims: self.identity_names.retain_claims(claims),
            headers,
            token_id: claims.get("jti").and_then(Value::as_str).map(Into::into),
            certificate_thumbprint: confirmation.certificate,
            dpop_key: confirmation.dpop_key,
            expires_at: claims.get("exp").and_then(seconds),
        })
    }
}

/// A NumericDate claim as whole seconds (a fractional value counts down, as jsonwebtoken does).
fn seconds(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// Removes one cookie from the request's `Cookie` headers, keeping the others.
fn remove_cookie(request: &mut request::Parts, name: &str) {
    let kept: Vec<String> = request
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(name))
        .map(str::to_owned)
        .collect();
    request.headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            request.headers.insert(header::COOKIE, value);
        }
    }
}

/// The token of `Bearer <token>` (or `DPoP <token>` where DPoP is enabled), and whether the
/// scheme was DPoP.
fn strip_bearer(value: &str, dpop: bool) -> Option<(bool, &str)> {
    let (scheme, token) = value.split_once(' ')?;
    let is_dpop = dpop && scheme.eq_ignore_ascii_case("dpop");
    (scheme.eq_ignore_ascii_case("bearer") || is_dpop)
        .then(|| (is_dpop, token.trim()))
        .filter(|(_, t)| !t.is_empty())
}

fn cookie_value<'a>(cookies: &'a str, name: &str) -> Option<&'a str> {
    cookies.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value).filter(|v| !v.is_empty())
    })
}

/// A short reason for the logs (never shown to the client).
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::MissingRequiredClaim(_) => "missing required claim",
        ErrorKind::InvalidAlgorithm => "algorithm does not fit the key",
        _ => "invalid token",
    }
}

/// Reads a key file named in the config (the error names the file).
fn read_key_file(path: &Path) -> Result<Vec<u8>, super::KeyError> {
    std::fs::read(path).map_err(|source| super::KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}
