//! Verification keys for a JWT provider: a JWKS document (from a file or a URL), a PEM public
//! key, or a shared secret. A remote JWKS is refreshed on a schedule and when a token names a
//! `kid` it does not know (rate-limited, so tokens with made-up `kid`s cannot cause a fetch
//! storm); a failed fetch keeps the last good keys.

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
    Algorithm, AlgorithmFamily, DecodingKey,
};

use crate::{
    pipeline::UpstreamBody,
    upstream::{ClientSettings, ConnectionPool, TargetScheme},
};

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not a JWKS document: {0}")]
    BadJwks(String),
    #[error("not a usable public key: {0}")]
    BadKey(String),
    #[error("fetching the JWKS failed: {0}")]
    Fetch(String),
}

/// One verification key and what it may verify.
pub struct KeyEntry {
    pub kid: Option<String>,
    pub key: DecodingKey,
    family: AlgorithmFamily,
    /// EC keys verify only the algorithm of their curve.
    curve: Option<EllipticCurve>,
    /// The JWK's own `alg`, when it names one.
    alg: Option<Algorithm>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

impl KeyEntry {
    /// The algorithm is bound to the key: family, curve and the JWK's declared `alg` must agree.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        alg.family() == self.family
            && self.alg.is_none_or(|declared| declared == alg)
            && match (&self.curve, alg) {
                (Some(EllipticCurve::P256), Algorithm::ES256) => true,
                (Some(EllipticCurve::P384), Algorithm::ES384) => true,
                (Some(EllipticCurve::Ed25519), Algorithm::EdDSA) => true,
                (Some(_), _) => false,
                (None, _) => true,
            }
    }
}

/// A set of keys, replaced as a whole on refresh.
#[derive(Debug, Default)]
pub struct KeySet {
    pub keys: Vec<KeyEntry>,
}

impl KeySet {
    /// Keys that may verify a token with this header: the key its `kid` names, and keys that have
    /// no `kid` (a PEM key or a secret is the provider's one key, whatever the token calls it).
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a KeyEntry> + 'a {
        self.keys.iter().filter(move |k| {
            (k.kid.is_none() || kid.is_none() || k.kid.as_deref() == kid) && k.accepts(alg)
        })
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Parses a JWKS document; keys of types this gateway cannot use are skipped.
    pub fn from_jwks(json: &[u8]) -> Result<Self, KeyError> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| KeyError::BadJwks(e.to_string()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let (family, curve) = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
                AlgorithmParameters::EllipticCurve(ec) => {
                    (AlgorithmFamily::Ec, Some(ec.curve.clone()))
                }
                AlgorithmParameters::OctetKeyPair(okp) => {
                    (AlgorithmFamily::Ed, Some(okp.curve.clone()))
                }
                // symmetric keys are never taken from a key document, nor are unknown kinds
                _ => continue,
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| serde_json::to_value(a).ok())
                .and_then(|v| v.as_str().and_then(|s| Algorithm::from_str(s).ok()));
            keys.push(KeyEntry {
                kid: jwk.common.key_id.clone(),
                key,
                family,
                curve,
                alg,
            });
        }
        if keys.is_empty() {
            return Err(KeyError::BadJwks("no usable public keys".into()));
        }
        Ok(Self { keys })
    }

    /// A PEM public key (RSA, EC P-256/P-384, Ed25519). The key type (and curve) is read from
    /// the key's own algorithm identifier, so the key can only verify its own kind of signature.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let text = String::from_utf8_lossy(pem);
        if text.contains("PRIVATE KEY") {
            return Err(KeyError::BadKey(
                "this is a private key; give the public key".into(),
            ));
        }
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|_| KeyError::BadKey("not PEM".into()))?;
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        const RSA: &[u8] = &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
        ];
        const EC: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
        const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
        let bad = |e: jsonwebtoken::errors::Error| KeyError::BadKey(e.to_string());
        let (key, family, curve) = if has(RSA) {
            (
                DecodingKey::from_rsa_pem(pem).map_err(bad)?,
                AlgorithmFamily::Rsa,
                None,
            )
        } else if has(EC) {
            let curve = if has(P256) {
                EllipticCurve::P256
            } else if has(P384) {
                EllipticCurve::P384
            } else {
                return Err(KeyError::BadKey(
                    "only P-256 and P-384 EC keys are supported".into(),
                ));
            };
            (
                DecodingKey::from_ec_pem(pem).map_err(bad)?,
                AlgorithmFamily::Ec,
                Some(curve),
            )
        } else if has(ED25519) {
            (
                DecodingKey::from_ed_pem(pem).map_err(bad)?,
                AlgorithmFamily::Ed,
                Some(EllipticCurve::Ed25519),
            )
        } else {
            return Err(KeyError::BadKey(
                "expected a PEM public key (RSA, EC or Ed25519)".into(),
            ));
        };
        Ok(Self {
            keys: vec![KeyEntry {
                kid: None,
                key,
                family,
                curve,
                alg: None,
            }],
        })
    }

    /// A shared secret for HS256/384/512.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            keys: vec![KeyEntry {
                kid: None,
                key: DecodingKey::from_secret(secret),
                family: AlgorithmFamily::Hmac,
                curve: None,
                alg: None,
            }],
        }
    }
}

/// Keys behind a URL.
pub struct RemoteJwks {
    pub url: Uri,
    pool: Arc<ConnectionPool>,
    keys: ArcSwap<KeySet>,
    pub refresh_interval: Duration,
    min_refresh_interval: Duration,
    /// Milliseconds since `epoch` of the last fetch attempt (0: never).
    last_attempt_ms: AtomicU64,
    epoch: Instant,
    /// Held while fetching: a request that needs new keys waits for a fetch in flight instead
    /// of failing or starting another.
    fetching: tokio::sync::Mutex<()>,
    /// Incremented by every successful fetch.
    generation: AtomicU64,
    /// Incremented when a fetch brings a different document (verified-token caches key on it).
    key_version: AtomicU64,
    document_hash: AtomicU64,
    /// `Some(issuer)`: `url` is an OpenID Connect discovery document, whose `jwks_uri` is fetched.
    discovery_issuer: Option<String>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("url", &self.url)
            .finish()
    }
}

impl RemoteJwks {
    pub fn new(
        url: Uri,
        refresh_interval: Duration,
        min_refresh_interval: Duration,
    ) -> Result<Self, KeyError> {
        let loopback = url.host().is_some_and(|host| {
            host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        let scheme = match url.scheme_str() {
            Some("https") => TargetScheme::Https,
            // keys fetched in the clear could be swapped by anyone on the path
            Some("http") if loopback => TargetScheme::Http1,
            Some("http") => {
                return Err(KeyError::Fetch(
                    "a JWKS URL must be https:// (http:// only to a loopback address)".into(),
                ))
            }
            _ => {
                return Err(KeyError::Fetch(
                    "the JWKS URL must be http:// or https://".into(),
                ))
            }
        };
        let tls =
            crate::tls::client_config(None, None).map_err(|e| KeyError::Fetch(e.to_string()))?;
        let settings = ClientSettings {
            scheme,
            tls: Arc::new(tls),
            tls_fingerprint: String::new(),
            server_name: None,
            connect_timeout: Duration::from_secs(3),
            max_idle: 1,
            idle_timeout: Duration::from_secs(30),
        };
        Ok(Self {
            url,
            pool: Arc::new(ConnectionPool::new(settings, 1)),
            keys: ArcSwap::from_pointee(KeySet::default()),
            refresh_interval,
            min_refresh_interval,
            last_attempt_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            fetching: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            key_version: AtomicU64::new(0),
            document_hash: AtomicU64::new(0),
            discovery_issuer: None,
        })
    }

    /// How soon a failed fetch is retried: the minimum interval, within 1 s and the refresh interval.
    pub fn retry_interval(&self) -> Duration {
        self.min_refresh_interval
            .max(Duration::from_secs(1))
            .min(self.refresh_interval)
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// For a token whose key is unknown: waits for a fetch in flight, or fetches now unless a
    /// fetch was attempted within the minimum interval. True when new keys may have arrived.
    pub async fn refresh_if_allowed(&self) -> bool {
        let seen = self.generation.load(Ordering::Acquire);
        let _fetching = self.fetching.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return true; // a fetch finished while we waited
        }
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_attempt_ms.load(Ordering::Acquire);
        if last != 0 && now < last + self.min_refresh_interval.as_millis() as u64 {
            return false;
        }
        self.fetch_and_store().await
    }

    /// Fetches and swaps in the keys; on failure the last good keys stay.
    pub async fn refresh(&self) -> bool {
        let _fetching = self.fetching.lock().await;
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> bool {
        self.last_attempt_ms.store(
            self.epoch.elapsed().as_millis() as u64 + 1,
            Ordering::Release,
        );
        match tokio::time::timeout(Duration::from_secs(5), self.fetch()).await {
            Ok(Ok((keys, hash))) => {
                crate::telemetry::metrics::PROCESS.jwks_refresh(&self.url.to_string(), true);
                if self.document_hash.swap(hash, Ordering::AcqRel) != hash {
                    self.key_version.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(url = %self.url, keys = keys.keys.len(), "JWKS changed");
                }
                self.keys.store(Arc::new(keys));
                self.generation.fetch_add(1, Ordering::AcqRel);
                true
            }
            Ok(Err(error)) => {
                crate::telemetry::metrics::PROCESS.jwks_refresh(&self.url.to_string(), false);
                tracing::warn!(url = %self.url, %error, "JWKS refresh failed; keeping the last good keys");
                false
            }
            Err(_) => {
                crate::telemetry::metrics::PROCESS.jwks_refresh(&self.url.to_string(), false);
                tracing::warn!(url = %self.url, "JWKS refresh timed out; keeping the last good keys");
                false
            }
        }
    }

    /// True once a fetch has succeeded (the key set was never fetched before that).
    pub fn has_been_fetched(&self) -> bool {
        self.generation.load(Ordering::Acquire) > 0
    }

    /// The key set's version: it changes whenever a fetch brings a different document.
    pub fn key_version(&self) -> u64 {
        self.key_version.load(Ordering::Acquire)
    }

    async fn fetch(&self) -> Result<(KeySet, u64), KeyError> {
        let jwks_url = match &self.discovery_issuer {
            None => self.url.clone(),
            Some(issuer) => {
                // OpenID Connect discovery: the document names the issuer and its key set
                let document: serde_json::Value =
                    serde_json::from_slice(&self.get(&self.url).await?)
                        .map_err(|e| KeyError::Fetch(format!("discovery document: {e}")))?;
                if document.get("issuer").and_then(serde_json::Value::as_str)
                    != Some(issuer.as_str())
                {
                    return Err(KeyError::Fetch(
                        "the discovery document names another issuer".into(),
                    ));
                }
                let uri: Uri = document
                    .get("jwks_uri")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|u| u.parse().ok())
                    .ok_or_else(|| {
                        KeyError::Fetch("the discovery document has no jwks_uri".into())
                    })?;
                if uri.scheme() != self.url.scheme() {
                    return Err(KeyError::Fetch(
                        "jwks_uri must use the issuer's scheme".into(),
                    ));
                }
                uri
            }
        };
        let document = self.get(&jwks_url).await?;
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            document.hash(&mut hasher);
            hasher.finish() | 1 // never 0, the "nothing fetched yet" value
        };
        Ok((KeySet::from_jwks(&document)?, hash))
    }

    async fn get(&self, url: &Uri) -> Result<Bytes, KeyError> {
        let host = url
            .host()
            .ok_or_else(|| KeyError::Fetch("URL has no host".into()))?;
        let port = url
            .port_u16()
            .unwrap_or(if url.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let authority: http::uri::Authority = format!("{host}:{port}")
            .parse()
            .map_err(|_| KeyError::Fetch("bad host".into()))?;
        let mut request = Request::new(UpstreamBody::Empty);
        *request.uri_mut() = url.clone();
        request.headers_mut().insert(
            header::HOST,
            http::HeaderValue::from_str(authority.as_str())
                .map_err(|e| KeyError::Fetch(e.to_string()))?,
        );
        request.headers_mut().insert(
            header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        let response = self
            .pool
            .send(&authority, request)
            .await
            .map_err(|failure| KeyError::Fetch(failure.error.to_string()))?;
        if !response.status().is_success() {
            return Err(KeyError::Fetch(format!("status {}", response.status())));
        }
        Ok(Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| KeyError::Fetch(e.to_string()))?
            .to_bytes())
    }
}

/// Remote key sets by URL and intervals, kept across reloads: a reload (even one that changes
/// nothing) must not throw away good keys and depend on the identity provider being up.
#[derive(Debug, Default)]
pub struct JwksRegistry {
    sets: std::sync::Mutex<std::collections::HashMap<String, Arc<RemoteJwks>>>,
}

impl JwksRegistry {
    pub fn get_or_create(
        &self,
        url: &Uri,
        refresh_interval: Duration,
        min_refresh_interval: Duration,
    ) -> Result<Arc<RemoteJwks>, KeyError> {
        let key = format!("{url}|{refresh_interval:?}|{min_refresh_interval:?}");
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = sets.get(&key) {
            return Ok(existing.clone());
        }
        let created = Arc::new(RemoteJwks::new(
            url.clone(),
            refresh_interval,
            min_refresh_interval,
        )?);
        sets.insert(key, created.clone());
        Ok(created)
    }

    /// A key set found through OpenID Connect discovery from `issuer`.
    pub fn get_or_discover(
        &self,
        issuer: &str,
        refresh_interval: Duration,
        min_refresh_interval: Duration,
    ) -> Result<Arc<RemoteJwks>, KeyError> {
        let key = format!("oidc:{issuer}|{refresh_interval:?}|{min_refresh_interval:?}");
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = sets.get(&key) {
            return Ok(existing.clone());
        }
        let url: Uri = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        )
        .parse()
        .map_err(|_| KeyError::Fetch(format!("`{issuer}` is not a URL")))?;
        let mut remote = RemoteJwks::new(url, refresh_interval, min_refresh_interval)?;
        remote.discovery_issuer = Some(issuer.to_owned());
        let created = Arc::new(remote);
        sets.insert(key, created.clone());
        Ok(created)
    }
}
