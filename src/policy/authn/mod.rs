//! Authentication: who is calling. Every non-public route names one or more methods; a request
//! passes if one of them verifies it, and is otherwise refused with 401 and a
//! `WWW-Authenticate` challenge that says nothing an attacker could use.
//!
//! Identity is never taken from the client: the identity headers sent upstream are removed from
//! every request first (on public routes too) and set only from a verified identity.

mod api_key;
mod cache;
mod dpop;
mod introspection;
mod jwe;
mod jwks;
mod jwt;
mod mtls;
mod replay;
mod revocation;

use std::sync::Arc;

use http::{request, HeaderName, HeaderValue};

pub use api_key::{generate_key, ApiKeySet};
pub use cache::sha256;
pub use dpop::{thumbprint as jwk_thumbprint, RequestScheme};
pub use introspection::IntrospectionProvider;
pub use jwks::{JwksRegistry, KeyError, KeySet, RemoteJwks};
pub use jwt::{JwtError, JwtProvider};
pub use mtls::{ClientCertificate, MtlsMethod};
pub use revocation::{RevocationList, RevocationSync, SharedRevocations};

use crate::pipeline::Challenge;

/// A verified caller.
#[derive(Debug)]
pub struct Identity {
    pub method: &'static str,
    pub provider: Arc<str>,
    pub subject: Box<str>,
    pub issuer: Option<Box<str>>,
    /// Role (or group) names the credential carried.
    pub roles: Vec<Box<str>>,
    /// OAuth scopes the credential carried (`scope`, `scp`).
    pub scopes: Vec<Box<str>>,
    /// The claims authorization reads (only those: see [`IdentityHeaderNames::policy_claims`]),
    /// by the dotted path the config names them with.
    pub claims: Vec<(Box<str>, serde_json::Value)>,
    /// Headers to send upstream, computed once at verification (cached tokens reuse them).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The token's `jti` and `exp`, for one-time use.
    pub token_id: Option<Box<str>>,
    /// RFC 8705 `cnf.x5t#S256`: the token is bound to this client certificate.
    pub certificate_thumbprint: Option<Box<str>>,
    /// RFC 9449 `cnf.jkt`: the token is bound to this DPoP key.
    pub dpop_key: Option<Box<str>>,
    pub expires_at: Option<u64>,
}

impl Identity {
    /// A retained claim by its dotted path. `sub` is always the verified subject, whatever a
    /// claims map says (an API key's configured `claims` cannot rename its identity).
    pub fn claim(&self, path: &str) -> Option<std::borrow::Cow<'_, serde_json::Value>> {
        if path == "sub" {
            return Some(std::borrow::Cow::Owned(serde_json::Value::from(
                &*self.subject,
            )));
        }
        self.claims
            .iter()
            .find(|(name, _)| &**name == path)
            .map(|(_, value)| std::borrow::Cow::Borrowed(value))
    }

    #[cfg(test)]
    pub(crate) fn for_test(subject: &str) -> Self {
        Self {
            method: "test",
            provider: "test".into(),
            subject: subject.into(),
            issuer: None,
            roles: Vec::new(),
            scopes: Vec::new(),
            claims: Vec::new(),
            headers: Vec::new(),
            token_id: None,
            certificate_thumbprint: None,
            dpop_key: None,
            expires_at: None,
        }
    }
}

/// The names of the identity headers (from `authentication.identity_headers`).
#[derive(Debug, Clone)]
pub struct IdentityHeaderNames {
    pub subject: HeaderName,
    pub issuer: HeaderName,
    pub method: HeaderName,
    pub provider: HeaderName,
    pub roles: HeaderName,
    /// Every header an identity may set, including configured claim headers: all are stripped
    /// from client requests.
    pub all: Vec<HeaderName>,
    /// Claims (dotted paths) that authorization conditions and external policy services read:
    /// identities keep these and no others, so a cached identity stays small.
    pub policy_claims: Box<[Box<str>]>,
}

impl IdentityHeaderNames {
    /// The claims of `claims` that authorization reads.
    pub fn retain_claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(Box<str>, serde_json::Value)> {
        self.policy_claims
            .iter()
            .filter_map(|path| Some((path.clone(), claim_at(claims, path)?.clone())))
            .collect()
    }
}

/// A claim by dotted path (`realm_access.roles`).
pub(crate) fn claim_at<'a>(
    claims: &'a serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Option<&'a serde_json::Value> {
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.get(part)?;
    }
    Some(value)
}

/// Names from a claim that is either a space-separated string (`scope`) or an array of strings.
pub(crate) fn names_in(value: Option<&serde_json::Value>) -> Vec<Box<str>> {
    match value {
        Some(serde_json::Value::String(text)) => text.split_whitespace().map(Into::into).collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(serde_json::Value::as_str)
            .map(Into::into)
            .collect(),
        _ => Vec::new(),
    }
}

/// OAuth scopes: `scope` (RFC 8693/9068, space-separated) or `scp` (array, some IdPs).
pub(crate) fn scopes_in(claims: &serde_json::Map<String, serde_json::Value>) -> Vec<Box<str>> {
    names_in(claims.get("scope").or_else(|| claims.get("scp")))
}

impl IdentityHeaderNames {
    /// Builds the upstream headers for an identity.
    pub fn headers_for(
        &self,
        method: &'static str,
        provider: &str,
        subject: &str,
        issuer: Option<&str>,
        roles: &[Box<str>],
        extra: Vec<(HeaderName, HeaderValue)>,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::with_capacity(5 + extra.len());
        let mut push = |name: &HeaderName, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.push((name.clone(), value));
            }
        };
        push(&self.subject, subject);
        push(&self.method, method);
        push(&self.provider, provider);
        if let Some(issuer) = issuer {
            push(&self.issuer, issuer);
        }
        // a role that itself contains a comma would read as two roles: such roles are dropped
        let roles: Vec<&str> = roles
            .iter()
            .map(|r| &**r)
            .filter(|r| !r.is_empty() && !r.contains([',', ' ']))
            .collect();
        if !roles.is_empty() {
            push(&self.roles, &roles.join(","));
        }
        headers.extend(extra);
        headers
    }

    /// Removes every identity header the client sent, and look-alikes spelled with `_` for `-`
    /// (some backends read `X_Auth_Subject` and `x-auth-subject` as the same variable).
    pub fn strip(&self, headers: &mut http::HeaderMap) {
        for name in &self.all {
            if headers.contains_key(name) {
                headers.remove(name);
            }
        }
        if headers.keys().any(|name| name.as_str().contains('_')) {
            let lookalikes: Vec<HeaderName> = headers
                .keys()
                .filter(|name| name.as_str().contains('_'))
                .filter(|name| {
                    let folded = name.as_str().replace('_', "-");
                    self.all.iter().any(|own| own.as_str() == folded)
                })
                .cloned()
                .collect();
            for name in lookalikes {
                headers.remove(name);
            }
        }
    }
}

/// One configured method.
#[derive(Debug)]
pub enum AuthMethod {
    Jwt(Arc<JwtProvider>),
    ApiKey(Arc<ApiKeySet>),
    Introspection(Arc<IntrospectionProvider>),
    Mtls(Arc<MtlsMethod>),
}

impl AuthMethod {
    /// Another handle on the same method (routes share a provider and its caches).
    pub fn share(&self) -> Self {
        match self {
            Self::Jwt(provider) => Self::Jwt(provider.clone()),
            Self::ApiKey(set) => Self::ApiKey(set.clone()),
            Self::Introspection(provider) => Self::Introspection(provider.clone()),
            Self::Mtls(method) => Self::Mtls(method.clone()),
        }
    }
}

/// Why no method verified a request (kept for the logs; the client only sees the challenge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credential of any accepted kind was present.
    Missing,
    /// A credential was present and did not verify.
    Invalid(&'static str),
}

/// A route's authentication: its methods, tried in order.
#[derive(Debug)]
pub struct Authenticator {
    pub methods: Vec<AuthMethod>,
    /// Checked after every successful verification, cached or not.
    pub revocations: Arc<RevocationList>,
}

impl Authenticator {
    /// The challenge for a refused request: Bearer when a token method (JWT, introspection) is
    /// accepted, else ApiKey when an API key is, else ClientCertificate.
    pub fn challenge(&self, failure: AuthFailure) -> Challenge {
        let bearer = self
            .methods
            .iter()
            .any(|m| matches!(m, AuthMethod::Jwt(_) | AuthMethod::Introspection(_)));
        let api_key = self
            .methods
            .iter()
            .any(|m| matches!(m, AuthMethod::ApiKey(_)));
        match (bearer, failure) {
            (true, AuthFailure::Missing) => Challenge::Bearer,
            (true, AuthFailure::Invalid(_)) => Challenge::BearerInvalidToken,
            (false, _) if api_key => Challenge::ApiKey,
            (false, _) => Challenge::ClientCertificate,
        }
    }

    /// Tries each method; the first that verifies wins. A present-but-invalid credential is
    /// reported over a missing one.
    pub async fn authenticate(
        &self,
        request: &mut request::Parts,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let mut failure = AuthFailure::Missing;
        for method in &self.methods {
            let result = match method {
                AuthMethod::Jwt(provider) => provider.authenticate(request).await,
                AuthMethod::ApiKey(set) => set.authenticate(request),
                AuthMethod::Introspection(provider) => provider.authenticate(request).await,
                AuthMethod::Mtls(method) => method.authenticate(request),
            };
            match result {
                Ok(identity)
                    if self
                        .revocations
                        .is_revoked(identity.token_id.as_deref(), &identity.subject) =>
                {
                    failure = AuthFailure::Invalid("revoked");
                    break;
                }
                Ok(identity) => {
                    // credentials of the route's other methods do not travel on either
                    for other in &self.methods {
                        match other {
                            AuthMethod::Jwt(provider) => provider.scrub(request),
                            AuthMethod::ApiKey(set) => set.scrub(request),
                            AuthMethod::Introspection(provider) => provider.scrub(request),
                            AuthMethod::Mtls(_) => {}
                        }
                    }
                    return Ok(identity);
                }
                Err(AuthFailure::Missing) => {}
                Err(invalid) => failure = invalid,
            }
        }
        Err(failure)
    }
}

/// What a token's `cnf` (confirmation) claim binds it to.
#[derive(Debug, Default)]
pub struct Confirmation {
    /// RFC 8705 `x5t#S256`: a client certificate.
    pub certificate: Option<Box<str>>,
    /// RFC 9449 `jkt`: a DPoP key.
    pub dpop_key: Option<Box<str>>,
}

/// Reads a token's `cnf` claim. A confirmation method this gateway cannot check (or `jkt` where
/// DPoP is not enabled) makes the token unusable here rather than a plain bearer token.
pub fn confirmation(
    cnf: Option<&serde_json::Value>,
    allow_dpop: bool,
) -> Result<Confirmation, AuthFailure> {
    let Some(cnf) = cnf else {
        return Ok(Confirmation::default());
    };
    let unsupported = || AuthFailure::Invalid("unsupported confirmation");
    let members = cnf.as_object().ok_or_else(unsupported)?;
    let mut confirmation = Confirmation::default();
    for (name, value) in members {
        let text = value
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(unsupported)?;
        match name.as_str() {
            "x5t#S256" => confirmation.certificate = Some(text.into()),
            "jkt" if allow_dpop => confirmation.dpop_key = Some(text.into()),
            _ => return Err(unsupported()),
        }
    }
    Ok(confirmation)
}

/// RFC 8705: a certificate-bound token is good only over a TLS connection that presented that
/// very certificate.
pub fn check_binding(identity: &Identity, request: &request::Parts) -> Result<(), AuthFailure> {
    let Some(bound) = &identity.certificate_thumbprint else {
        return Ok(());
    };
    let presented = request
        .extensions
        .get::<Arc<ClientCertificate>>()
        .map(|c| c.thumbprint.as_str());
    if presented == Some(&**bound) {
        Ok(())
    } else {
        Err(AuthFailure::Invalid("certificate binding mismatch"))
    }
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Removes a query parameter (a token or key that must not travel further or into logs).
pub fn remove_query_param(request: &mut request::Parts, name: &str) {
    let Some(query) = request.uri.query() else {
        return;
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some(name))
        .collect();
    let path = request.uri.path();
    let path_and_query = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = http::uri::Parts::from(request.uri.clone());
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            request.uri = uri;
        }
    }
}

/// The value of query parameter `name`, if present.
pub fn query_param<'a>(request: &'a request::Parts, name: &str) -> Option<&'a str> {
    request.uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// Background refresh of remote JWKS for one snapshot's providers; dropping it stops them.
#[derive(Debug, Default)]
pub struct KeyRefreshers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KeyRefreshers {
    /// Fetches each remote key set now, then every `refresh_interval`. Call inside a runtime.
    pub fn start(providers: &[Arc<JwtProvider>]) -> Self {
        let tasks = providers
            .iter()
            .filter_map(|provider| provider.remote().cloned())
            .map(|remote| {
                tokio::spawn(async move {
                    loop {
                        // after a failure, try again soon rather than a whole interval later
                        let wait = if remote.refresh().await {
                            remote.refresh_interval
                        } else {
                            remote.retry_interval()
                        };
                        tokio::time::sleep(wait).await;
                    }
                })
            })
            .collect();
        Self { tasks }
    }
}

impl Drop for KeyRefreshers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
