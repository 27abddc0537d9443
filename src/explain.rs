//! `portcullis explain`: what the gateway would decide for a request and why, from the config
//! alone: the route, the identity, its roles, and the rule that allowed or the reason it denied.
//!
//! It runs the same compiled snapshot as the gateway: tokens and API keys go through the route's
//! real authentication (remote key sets are fetched once), and the decision through the route's
//! real authorization, external policy service included.

use std::{fmt::Write as _, net::IpAddr};

use http::{HeaderMap, HeaderValue, Method, Request};
use serde_json::{Map, Value};

use crate::{
    policy::{
        authn::{AuthMethod, Identity},
        authz::{RequestContext, RequestFacts},
        Access,
    },
    proxy::Snapshot,
    route::{normalize_path, request_host},
};

/// The request to explain.
#[derive(Debug)]
pub struct Query {
    pub method: Method,
    pub path: String,
    /// `Host` (routes may match on it).
    pub host: String,
    /// Other request headers (routes may match on them; external services may read them).
    pub headers: HeaderMap,
    /// The listener the request arrives on (default: the first).
    pub listener: Option<String>,
    pub client_ip: IpAddr,
    pub credential: Credential,
}

/// What the request carries.
#[derive(Debug)]
pub enum Credential {
    None,
    /// A token, presented as `Authorization: Bearer`.
    Token(String),
    /// Claims taken as if a token carrying them had verified (nothing is verified).
    Claims(Map<String, Value>),
    /// An API key, presented in each API-key method's header.
    ApiKey(String),
}

/// The outcome, as text for a terminal.
#[derive(Debug)]
pub struct Explanation {
    pub allowed: bool,
    pub text: String,
}

/// Explains `query` against `snapshot`.
pub async fn explain(snapshot: &Snapshot, query: &Query) -> Explanation {
    let mut text = String::new();
    let verdict = decide(snapshot, query, &mut text).await;
    let _ = writeln!(
        text,
        "decision:  {}",
        match &verdict {
            Ok(()) => "ALLOW".to_owned(),
            Err(status) => format!("DENY ({status})"),
        }
    );
    Explanation {
        allowed: verdict.is_ok(),
        text,
    }
}

async fn decide(snapshot: &Snapshot, query: &Query, out: &mut String) -> Result<(), &'static str> {
    let _ = writeln!(out, "request:   {} {}", query.method, query.path);
    // what the handler reads: the path without its query, the host as `request_host` sees it
    let raw_path = query
        .path
        .split_once('?')
        .map_or(&*query.path, |(path, _)| path);
    let Ok(path) = normalize_path(raw_path) else {
        let _ = writeln!(
            out,
            "reason:    the path is malformed (encoded slash, NUL, ...)"
        );
        return Err("400");
    };
    if path != raw_path {
        let _ = writeln!(out, "normalised: {path}");
    }
    let mut headers = query.headers.clone();
    if !query.host.is_empty() {
        let host = HeaderValue::from_str(&query.host)
            .map_err(|_| "400: the host is not a header value")?;
        headers.insert(http::header::HOST, host);
    }
    let uri = http::Uri::from_static("/");
    let host = request_host(&uri, &headers);
    let listener = match &query.listener {
        None => snapshot.listeners.first(),
        Some(name) => snapshot.listener(name),
    };
    let Some(listener) = listener else {
        let _ = writeln!(out, "reason:    no such listener");
        return Err("no listener");
    };
    let Some(route) = snapshot
        .routes
        .find(listener.index, &host, &query.method, &path, &headers)
    else {
        let _ = writeln!(out, "route:     none matches");
        return Err("404");
    };
    let _ = writeln!(out, "route:     {}", route.name);
    let authenticator = match &route.policies.access {
        Access::Public => {
            let _ = writeln!(out, "reason:    the route is public (`public: true`)");
            return Ok(());
        }
        Access::Authenticated(authenticator) => authenticator,
    };

    let identity = match identify(authenticator, &query.credential, &headers, out).await {
        Ok(identity) => identity,
        Err(reason) => {
            let _ = writeln!(out, "identity:  none ({reason})");
            return Err("401");
        }
    };
    let _ = writeln!(
        out,
        "identity:  {} (via {} `{}`)",
        identity.subject, identity.method, identity.provider
    );
    let listed = |items: &[Box<str>]| {
        if items.is_empty() {
            "(none)".to_owned()
        } else {
            items.join(", ")
        }
    };
    let _ = writeln!(out, "credential roles: {}", listed(&identity.roles));
    let _ = writeln!(out, "scopes:    {}", listed(&identity.scopes));
    let Some(authorization) = &route.policies.authorization else {
        return Ok(());
    };
    let roles = &authorization.policy.roles;
    let effective = roles.expand(&roles.of(&identity));
    let _ = writeln!(
        out,
        "roles:     {}",
        if effective.is_empty() {
            "(no configured role)".to_owned()
        } else {
            effective.join(", ")
        }
    );
    let decision = authorization
        .authorize(
            &identity,
            &RequestFacts {
                method: &query.method,
                path: &path,
                client_ip: query.client_ip,
            },
            &RequestContext {
                host: &host,
                route: &route.name,
                headers: &headers,
            },
        )
        .await;
    let _ = writeln!(out, "reason:    {}", decision.reason);
    if decision.allowed {
        Ok(())
    } else {
        Err("403")
    }
}

async fn identify(
    authenticator: &crate::policy::authn::Authenticator,
    credential: &Credential,
    headers: &HeaderMap,
    out: &mut String,
) -> Result<std::sync::Arc<Identity>, String> {
    let mut request = Request::new(()).into_parts().0;
    request.headers = headers.clone();
    match credential {
        Credential::None => return Err("no credential given: the gateway answers 401".into()),
        Credential::Claims(claims) => {
            let provider = authenticator
                .methods
                .iter()
                .find_map(|m| match m {
                    AuthMethod::Jwt(provider) => Some(provider),
                    _ => None,
                })
                .ok_or("--claims needs a route with a JWT method")?;
            let _ = writeln!(
                out,
                "note:      claims taken as given; no signature was checked"
            );
            return provider
                .identity_from_claims(claims)
                .map(std::sync::Arc::new)
                .map_err(|failure| format!("the claims do not make an identity: {failure:?}"));
        }
        Credential::Token(token) => {
            for method in &authenticator.methods {
                if let AuthMethod::Jwt(provider) = method {
                    if let Some(remote) = provider.remote() {
                        remote.refresh().await;
                    }
                }
            }
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "the token is not a valid header value")?;
            request.headers.insert(http::header::AUTHORIZATION, value);
        }
        Credential::ApiKey(key) => {
            let value =
                HeaderValue::from_str(key).map_err(|_| "the key is not a valid header value")?;
            for method in &authenticator.methods {
                if let AuthMethod::ApiKey(set) = method {
                    request.headers.insert(set.header().clone(), value.clone());
                }
            }
        }
    }
    authenticator
        .authenticate(&mut request)
        .await
        .map_err(|failure| match failure {
            crate::policy::authn::AuthFailure::Missing => {
                "the route accepts no credential of this kind: the gateway answers 401".to_owned()
            }
            crate::policy::authn::AuthFailure::Invalid(reason) => {
                format!("the credential does not verify ({reason}): the gateway answers 401")
            }
        })
}
