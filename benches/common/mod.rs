//! What the benches share: compiling a config, finding a route, and a request record as the
//! handler would have it after routing.
// each bench uses part of this module
#![allow(dead_code)]

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

/// The snapshot a config text compiles to (through the real loader and compiler).
pub fn compile(yaml: &str) -> portcullis::proxy::Snapshot {
    let loaded = portcullis::config::load_str(yaml, "bench.yaml".as_ref(), ".".into(), &|_| None)
        .expect("valid");
    portcullis::proxy::compile(&loaded, &portcullis::upstream::UpstreamRegistry::new(1), 0)
        .expect("compiles")
}

/// The route a `GET path` on the first listener reaches.
pub fn route(
    snapshot: &portcullis::proxy::Snapshot,
    path: &str,
) -> std::sync::Arc<portcullis::proxy::snapshot::Route> {
    snapshot
        .routes
        .find(0, "", &Method::GET, path, &http::HeaderMap::new())
        .expect("the route")
        .clone()
}
