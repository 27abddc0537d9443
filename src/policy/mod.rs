//! The policy chain: what runs between routing and forwarding, per route.
//!
//! Each route holds its compiled policies, one field per phase, in [`RoutePolicies`]; the order is
//! written once, in [`run_request_phase`], which destructures the struct without `..` so a new
//! policy field cannot be added without deciding where it runs. Policies answer with [`Flow`]:
//! carry on, or respond now. Authorization, rate limits and caching plug in as further fields.

pub mod authn;

use std::sync::Arc;

use http::{request, Response};

use crate::pipeline::{GatewayError, RequestCtx, ResponseBody};

/// What a policy decided about a request.
pub enum Flow {
    /// Go on to the next phase.
    Continue,
    /// Answer the client with this response; later phases and the upstream are skipped.
    Respond(Box<Response<ResponseBody>>),
}

/// Who may use a route.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone: the config said `public: true` explicitly (zero trust has no implicit default).
    Public,
    /// Whoever one of these methods verifies.
    Authenticated(Arc<authn::Authenticator>),
}

/// A route's compiled policies, one field per phase.
#[derive(Debug, Clone)]
pub struct RoutePolicies {
    /// Identity headers, stripped from every request before anything reads them.
    pub identity_headers: Arc<authn::IdentityHeaderNames>,
    pub access: Access,
}

/// Runs the request-side phases in order.
pub async fn run_request_phase(
    policies: &RoutePolicies,
    ctx: &mut RequestCtx,
    request: &mut request::Parts,
) -> Result<Flow, GatewayError> {
    let RoutePolicies {
        identity_headers,
        access,
    } = policies;
    // 1. a client never speaks for the gateway: strip identity headers it sent, on every route,
    //    before any policy could read them
    identity_headers.strip(&mut request.headers);
    // 2. authentication: public routes by explicit configuration, others by one of their methods
    match access {
        Access::Public => {}
        Access::Authenticated(authenticator) => match authenticator.authenticate(request).await {
            Ok(identity) => {
                for (name, value) in &identity.headers {
                    request.headers.insert(name.clone(), value.clone());
                }
                ctx.identity = Some(identity);
            }
            Err(failure) => {
                ctx.auth_failure = Some(match failure {
                    authn::AuthFailure::Missing => "missing credential",
                    authn::AuthFailure::Invalid(reason) => reason,
                });
                return Err(GatewayError::Unauthorized(authenticator.challenge(failure)));
            }
        },
    }
    Ok(Flow::Continue)
}
