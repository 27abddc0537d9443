//! OAuth 2.0 token introspection (RFC 7662) for opaque tokens: the gateway asks the
//! authorization server whether a bearer token is active.
//!
//! Fail closed: an error, a timeout or an unexpected answer refuses the request and is never
//! remembered; only active answers are cached, until the token's `exp` and at most
//! `max_cache_ttl`, so a revocation at the server takes effect within that time.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, request, HeaderValue};
use serde_json::{Map, Value};

use super::{
    cache::{sha256, VerifiedCache},
    unix_now, AuthFailure, Identity, IdentityHeaderNames,
};
use crate::{config::model::IntrospectionConfig, upstream::ServiceEndpoint};

/// A compiled introspection client.
pub struct IntrospectionProvider {
    pub name: Arc<str>,
    endpoint: ServiceEndpoint,
    credentials: HeaderValue,
    timeout: Duration,
    max_cache_ttl: u64,
    cache: VerifiedCache,
    audiences: Vec<String>,
    roles_claim: String,
    forward_token: bool,
    identity_names: Arc<IdentityHeaderNames>,
}

impl std::fmt::Debug for IntrospectionProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionProvider")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl IntrospectionProvider {
    pub fn from_config(
        config: &IntrospectionConfig,
        identity_names: Arc<IdentityHeaderNames>,
    ) -> Result<Self, String> {
        let endpoint = ServiceEndpoint::from_url(&config.endpoint, config.timeout.0)?;
        // RFC 6749 §2.3.1: client id and secret are form-encoded before the Basic encoding
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_encode(&config.client_id),
            form_encode(&config.client_secret)
        ));
        let credentials = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| "bad client credentials".to_owned())?;
        Ok(Self {
            name: config.name.as_str().into(),
            endpoint,
            credentials,
            timeout: config.timeout.0,
            max_cache_ttl: config.max_cache_ttl.0.as_secs(),
            cache: VerifiedCache::new(config.cache_size),
            audiences: config.audiences.clone(),
            roles_claim: config.roles_claim.clone(),
            forward_token: config.forward_token,
            identity_names,
        })
    }

    pub async fn authenticate(
        &self,
        request: &mut request::Parts,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let mut values = request.headers.get_all(header::AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (None, _) => return Err(AuthFailure::Missing),
            (Some(_), Some(_)) => return Err(AuthFailure::Invalid("more than one credential")),
            (Some(value), None) => value.clone(),
        };
        let text = value
            .to_str()
            .map_err(|_| AuthFailure::Invalid("malformed token"))?;
        let (scheme, token) = text.split_once(' ').ok_or(AuthFailure::Missing)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthFailure::Missing);
        }
        let identity = self.introspect(token).await?;
        super::check_binding(&identity, request)?;
        if !self.forward_token {
            request.headers.remove(header::AUTHORIZATION);
        }
        Ok(identity)
    }

    /// Scrubs nothing: a bearer token that another method of the route accepted stays unless
    /// this provider is told not to forward tokens.
    pub fn scrub(&self, request: &mut request::Parts) {
        if !self.forward_token {
            request.headers.remove(header::AUTHORIZATION);
        }
    }

    async fn introspect(&self, token: &str) -> Result<Arc<Identity>, AuthFailure> {
        let now = unix_now();
        let digest = sha256(token.as_bytes());
        if let Some(identity) = self.cache.get(&digest, now, 0) {
            return Ok(identity);
        }
        let answer = match tokio::time::timeout(self.timeout, self.ask(token)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(reason)) => {
                tracing::warn!(
                    provider = &*self.name,
                    reason,
                    "token introspection failed; refusing"
                );
                return Err(AuthFailure::Invalid("introspection failed"));
            }
            Err(_) => {
                tracing::warn!(
                    provider = &*self.name,
                    "token introspection timed out; refusing"
                );
                return Err(AuthFailure::Invalid("introspection timed out"));
            }
        };
        if answer.get("active") != Some(&Value::Bool(true)) {
            return Err(AuthFailure::Invalid("inactive token"));
        }
        let exp = answer.get("exp").and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        });
        if exp.is_some_and(|exp| exp <= now) {
            return Err(AuthFailure::Invalid("expired"));
        }
        if !self.audiences.is_empty() {
            let matches = match answer.get("aud") {
                Some(Value::String(aud)) => self.audiences.iter().any(|a| a == aud),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|aud| self.audiences.iter().any(|a| a == aud)),
                _ => false,
            };
            if !matches {
                return Err(AuthFailure::Invalid("wrong audience"));
            }
        }
        let identity = Arc::new(self.identity(&answer)?);
        let valid_until = exp.unwrap_or(u64::MAX).min(now + self.max_cache_ttl);
        self.cache
            .insert(digest, valid_until, 0, identity.clone(), now);
        Ok(identity)
    }

    async fn ask(&self, token: &str) -> Result<Map<String, Value>, &'static str> {
        let body = format!("token={}&token_type_hint=access_token", form_encode(token));
        self.endpoint
            .post_for_json(
                "application/x-www-form-urlencoded",
                &[(header::AUTHORIZATION, self.credentials.clone())],
                Bytes::from(body),
            )
            .await
    }

    fn identity(&self, answer: &Map<String, Value>) -> Result<Identity, AuthFailure> {
        let subject = ["sub", "username", "client_id"]
            .iter()
            .find_map(|claim| {
                answer
                    .get(*claim)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            })
            .ok_or(AuthFailure::Invalid("no subject"))?;
        let issuer = answer.get("iss").and_then(Value::as_str);
        let roles = super::names_in(answer.get(&self.roles_claim));
        let headers = self.identity_names.headers_for(
            "introspection",
            &self.name,
            subject,
            issuer,
            &roles,
            Vec::new(),
        );
        Ok(Identity {
            method: "introspection",
            provider: self.name.clone(),
            subject: subject.into(),
            issuer: issuer.map(Into::into),
            roles,
            scopes: super::names_in(answer.get("scope")),
            claims: self.identity_names.retain_claims(answer),
            headers,
            token_id: None,
            certificate_thumbprint: super::confirmation(answer.get("cnf"), false)?.certificate,
            dpop_key: None,
            expires_at: answer.get("exp").and_then(Value::as_u64),
        })
    }
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
