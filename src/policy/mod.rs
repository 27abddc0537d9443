//! The policy chain: what runs between routing and forwarding, per route.
//!
//! Each route holds its compiled policies, one field per phase, in [`RoutePolicies`]; the order is
//! written once, in [`run_request_phase`], which destructures the struct without `..` so a new
//! policy field cannot be added without deciding where it runs. Policies answer with [`Flow`]:
//! carry on, or respond now (e.g. 401/403/429).
//!
//! Today the chain has one phase, access: a route is either public (declared `public: true`) or,
//! once authentication lands, guarded by its methods. Authorization, rate limits and caching plug
//! in as further fields.

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
}

/// A route's compiled policies, one field per phase.
#[derive(Debug, Clone)]
pub struct RoutePolicies {
    pub access: Access,
}

/// Runs the request-side phases in order.
pub async fn run_request_phase(
    policies: &RoutePolicies,
    _ctx: &mut RequestCtx,
    _request: &mut request::Parts,
) -> Result<Flow, GatewayError> {
    let RoutePolicies { access } = policies;
    // 1. access: public routes are served without identity, by explicit configuration
    match access {
        Access::Public => {}
    }
    Ok(Flow::Continue)
}
