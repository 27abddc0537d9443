//! The one place that turns request-path errors into client responses.
//!
//! Clients get a status and a small JSON body naming the kind of error and the request id, never
//! internal detail (no upstream addresses, no stack of causes); the detail goes to the log.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;

/// Everything the gateway itself may answer a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("no healthy upstream target")]
    NoHealthyTarget,
    #[error("upstream connection failed")]
    UpstreamConnect,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream protocol error")]
    UpstreamProtocol,
    #[error("gateway is shutting down")]
    ShuttingDown,
    #[error("not authenticated")]
    Unauthorized(Challenge),
    #[error("not authorized")]
    Forbidden,
    #[error("rate limited")]
    TooManyRequests { retry_after_secs: u32 },
    #[error("rate limits unavailable")]
    LimiterUnavailable,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("a call of a composed response failed")]
    CompositionFailed,
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750 style). Deliberately coarse: a client
/// learns that its credential was missing or not accepted, never why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// No credential: `Bearer realm="portcullis"`.
    Bearer,
    /// A bearer token that did not verify: `error="invalid_token"`.
    BearerInvalidToken,
    /// API-key-only routes.
    ApiKey,
    /// Routes that accept only client certificates.
    ClientCertificate,
}

impl Challenge {
    fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Bearer => "Bearer realm=\"portcullis\"",
            Self::BearerInvalidToken => "Bearer realm=\"portcullis\", error=\"invalid_token\"",
            Self::ApiKey => "ApiKey realm=\"portcullis\"",
            Self::ClientCertificate => "ClientCertificate realm=\"portcullis\"",
        })
    }
}

impl GatewayError {
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoHealthyTarget
            | Self::ShuttingDown
            | Self::LimiterUnavailable
            | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamConnect | Self::UpstreamProtocol | Self::CompositionFailed => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Stable machine-readable code, used in the JSON body, logs and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoRoute => "not_found",
            Self::BadRequest(_) => "bad_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::NoHealthyTarget => "no_healthy_upstream",
            Self::UpstreamConnect => "upstream_connect_failure",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamProtocol => "upstream_protocol_error",
            Self::ShuttingDown => "shutting_down",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::LimiterUnavailable => "rate_limit_unavailable",
            Self::Overloaded => "overloaded",
            Self::CompositionFailed => "composition_failed",
        }
    }

    /// Human text safe to show a client.
    fn public_message(self) -> &'static str {
        match self {
            Self::NoRoute => "no route matches this request",
            Self::BadRequest(reason) => reason,
            Self::PayloadTooLarge => "request body is too large",
            Self::NoHealthyTarget | Self::LimiterUnavailable | Self::Overloaded => {
                "the service is temporarily unavailable"
            }
            Self::UpstreamConnect | Self::UpstreamProtocol => {
                "the upstream service failed to answer"
            }
            Self::UpstreamTimeout => "the upstream service did not answer in time",
            Self::CompositionFailed => "a service this response is composed of failed to answer",
            Self::ShuttingDown => "the gateway is restarting; retry",
            Self::Unauthorized(_) => "authentication is required",
            // the same words whatever rule denied: the policy is not the client's to learn
            Self::Forbidden => "you are not allowed to do this",
            Self::TooManyRequests { .. } => {
                "too many requests; retry after the time in Retry-After"
            }
        }
    }

    /// The response for this error, carrying the request id.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<ResponseBody> {
        let mut response = error_response(
            self.status(),
            self.code(),
            self.public_message(),
            request_id,
        );
        match self {
            Self::Unauthorized(challenge) => {
                response
                    .headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, challenge.header_value());
            }
            Self::TooManyRequests { retry_after_secs } => {
                response.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs),
                );
            }
            Self::Overloaded => {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl GatewayError {
    /// The gRPC status code for this error (gRPC clients read `grpc-status`, not the HTTP
    /// status: a JSON 401 would reach them as "internal error").
    pub fn grpc_status(self) -> u8 {
        match self {
            Self::Unauthorized(_) => 16, // UNAUTHENTICATED
            Self::Forbidden => 7,        // PERMISSION_DENIED
            Self::NoRoute => 12,         // UNIMPLEMENTED
            Self::UpstreamTimeout => 4,  // DEADLINE_EXCEEDED
            Self::TooManyRequests { .. } | Self::PayloadTooLarge => 8, // RESOURCE_EXHAUSTED
            Self::NoHealthyTarget
            | Self::ShuttingDown
            | Self::LimiterUnavailable
            | Self::Overloaded
            | Self::UpstreamConnect => 14, // UNAVAILABLE
            Self::BadRequest(_) | Self::UpstreamProtocol | Self::CompositionFailed => 13, // INTERNAL
        }
    }

    /// This error as a gRPC "trailers-only" response: HTTP 200, `grpc-status` and
    /// `grpc-message` in the head, no body. `content_type` is the request's (`application/grpc`,
    /// `application/grpc-web`, ...), echoed so gRPC-Web clients accept it too.
    pub fn into_grpc_response(
        self,
        request_id: &HeaderValue,
        content_type: HeaderValue,
    ) -> Response<ResponseBody> {
        let mut response = self.into_response(request_id);
        *response.body_mut() = ResponseBody::empty();
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::CONTENT_TYPE, content_type);
        headers.insert(
            GRPC_STATUS,
            HeaderValue::from(u16::from(self.grpc_status())),
        );
        // the public message is plain ASCII without `%`: valid as a percent-encoded value
        if let Ok(message) = HeaderValue::from_str(self.public_message()) {
            headers.insert(GRPC_MESSAGE, message);
        }
        response
    }
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// A JSON error response: `{"error": code, "message": text, "request_id": id}`.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "error": code,
        "message": message,
        "request_id": request_id.to_str().unwrap_or_default(),
    });
    let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(super::X_REQUEST_ID, request_id.clone());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_status_and_a_json_body_without_detail() {
        let id = HeaderValue::from_static("abc123");
        for (error, status) in [
            (GatewayError::NoRoute, 404),
            (GatewayError::BadRequest("bad path"), 400),
            (GatewayError::PayloadTooLarge, 413),
            (GatewayError::NoHealthyTarget, 503),
            (GatewayError::UpstreamConnect, 502),
            (GatewayError::UpstreamTimeout, 504),
            (GatewayError::UpstreamProtocol, 502),
            (GatewayError::CompositionFailed, 502),
            (GatewayError::ShuttingDown, 503),
            (GatewayError::Unauthorized(Challenge::Bearer), 401),
            (GatewayError::Forbidden, 403),
            (
                GatewayError::TooManyRequests {
                    retry_after_secs: 3,
                },
                429,
            ),
            (GatewayError::LimiterUnavailable, 503),
            (GatewayError::Overloaded, 503),
        ] {
            let response = error.into_response(&id);
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(response.headers()["x-request-id"], "abc123");
        }
    }
}
