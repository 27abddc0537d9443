//! The request pipeline's shared vocabulary: the per-request record, bodies, and the error type
//! with its single mapping to client responses. Everything on the request path speaks these types.

mod body;
mod client_body;
mod ctx;
mod error;

pub use body::{BodyProgress, BodyTooLarge, BoxError, ResponseBody, UpstreamBody};
pub use client_body::ClientBody;
pub use ctx::{Arrival, Completion, ConnActivity, InFlightGuard, PhaseTiming, RequestCtx};
pub use error::{error_response, Challenge, GatewayError};

use http::HeaderName;

/// The request id header: kept from trusted proxies, generated otherwise, echoed to the client.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
