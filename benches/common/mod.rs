//! What the benches share: a request record as the handler would have it after routing.

use http::{HeaderValue, Method, Version};
use portcullis::pipeline::{Arrival, RequestCtx};

/// A GET from 198.51.100.7 on listener `main`, routed to `route`.
pub fn routed_ctx(route: &str, path: &str) -> RequestCtx {
    let mut ctx = RequestCtx::new(Arrival {
        request_id: HeaderValue::from_static("5c2b3a0e9d8f4e1aa3b2c1d0e9f8a7b6"),
        peer: "127.0.0.1:40000".parse().unwrap(),
        client_ip: "198.51.100.7".parse().unwrap(),
        listener: "main".into(),
        tls: false,
        method: Method::GET,
        version: Version::HTTP_11,
        user_agent: Some(HeaderValue::from_static("bench/1.0")),
        tls_version: None,
    });
    ctx.path = path.into();
    ctx.route = Some(route.into());
    ctx
}
