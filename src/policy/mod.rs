//! The policy chain: what runs between routing and forwarding, per route.
//!
//! Each route holds its compiled policies, one field per phase, in [`RoutePolicies`]; the order is
//! written once, in [`run_request_phase`], which destructures the struct without `..` so a new
//! policy field cannot be added without deciding where it runs. Policies answer with [`Flow`]:
//! carry on, or respond now. Authorization, rate limits and caching plug in as further fields.

pub mod authn;
pub mod authz;
pub mod ratelimit;

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
    /// What an authenticated identity may do here (`None` on public routes only).
    pub authorization: Option<Arc<authz::RouteAuthorization>>,
    /// The route's rate-limit rules (`None`: no rule applies).
    pub rate_limits: Option<Arc<ratelimit::RouteLimits>>,
    /// Adaptive limits (the same for every route): blocks and multipliers by behaviour.
    pub adaptive: Option<Arc<ratelimit::Adaptive>>,
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
        authorization,
        rate_limits,
        adaptive,
    } = policies;
    // 1. a client never speaks for the gateway: strip identity headers it sent, on every route,
    //    before any policy could read them
    identity_headers.strip(&mut request.headers);
    // 2. rate limits that need no identity: a flood or a password-guessing client is stopped
    //    before any credential is verified
    if let Some(adaptive) = adaptive {
        assess(adaptive, ctx, None)?;
    }
    if let Some(limits) = rate_limits {
        check_limits(limits, ratelimit::Phase::BeforeAuth, ctx, request).await?;
    }
    // 3. authentication: public routes by explicit configuration, others by one of their methods
    match access {
        Access::Public => {}
        Access::Authenticated(authenticator) => {
            let started = ctx.phase_start();
            let authenticated = authenticator.authenticate(request).await;
            ctx.phase_end("authenticate", started);
            match authenticated {
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
            }
        }
    }
    // 4. authorization: deny unless a rule allows (every authenticated route has one)
    if let Some(authorization) = authorization {
        // an authorized route without an identity cannot happen today; if it ever could, it
        // must not mean "allowed"
        let Some(identity) = ctx.identity.clone() else {
            return Err(GatewayError::Forbidden);
        };
        let facts = authz::RequestFacts {
            method: &request.method,
            path: &ctx.path,
            client_ip: ctx.client_ip,
        };
        let started = ctx.phase_start();
        let route = ctx.route.as_deref().unwrap_or_default();
        let decision = authorization
            .authorize(
                &identity,
                &facts,
                &authz::RequestContext {
                    host: &ctx.host,
                    route,
                    headers: &request.headers,
                },
            )
            .await;
        let allowed = decision.allowed;
        ctx.authorization = Some(decision);
        ctx.phase_end("authorize", started);
        if !allowed {
            return Err(GatewayError::Forbidden);
        }
    }
    // 5. rate limits keyed by identity (subject, API key, claims), with the subject's score
    if let (Some(adaptive), Some(identity)) = (adaptive, ctx.identity.clone()) {
        if let Err(blocked) = assess(adaptive, ctx, Some(&identity)) {
            // what the first phase counted is given back: a blocked request costs nothing
            if let Some(limits) = rate_limits {
                limits.refund(&mut ctx.rate_limit).await;
            }
            return Err(blocked);
        }
    }
    if let Some(limits) = rate_limits {
        check_limits(limits, ratelimit::Phase::AfterAuth, ctx, request).await?;
    }
    Ok(Flow::Continue)
}

/// Applies a client's behaviour score: a block refuses, a multiplier tightens its limits.
fn assess(
    adaptive: &ratelimit::Adaptive,
    ctx: &mut RequestCtx,
    identity: Option<&authn::Identity>,
) -> Result<(), GatewayError> {
    let assessment = adaptive.assess(ctx.client_ip, identity);
    if assessment.blocked_for > 0 {
        ctx.rate_limit.blocked = true;
        let seconds = assessment.blocked_for.div_ceil(1_000_000_000).max(1);
        return Err(GatewayError::TooManyRequests {
            retry_after_secs: u32::try_from(seconds).unwrap_or(u32::MAX),
        });
    }
    ctx.rate_limit.multiplier = assessment.multiplier;
    Ok(())
}

/// Runs one phase of a route's rate limits, recording the outcome (and its timing) in `ctx`.
async fn check_limits(
    limits: &ratelimit::RouteLimits,
    phase: ratelimit::Phase,
    ctx: &mut RequestCtx,
    request: &request::Parts,
) -> Result<(), GatewayError> {
    let started = ctx.phase_start();
    let checked = check_limits_untimed(limits, phase, ctx, request).await;
    ctx.phase_end("rate_limit", started);
    checked
}

async fn check_limits_untimed(
    limits: &ratelimit::RouteLimits,
    phase: ratelimit::Phase,
    ctx: &mut RequestCtx,
    request: &request::Parts,
) -> Result<(), GatewayError> {
    let mut record = std::mem::take(&mut ctx.rate_limit);
    let identity = ctx.identity.clone();
    let checked = limits
        .check(
            phase,
            &ratelimit::KeySource {
                ctx,
                request,
                identity: identity.as_deref(),
            },
            &mut record,
        )
        .await;
    ctx.rate_limit = record;
    checked
}
