//! Portcullis: a zero-trust API gateway.
//!
//! A request flows one way: listener → route → policy chain → upstream → response → access log.
//! Everything a request needs is compiled once per config load into an immutable
//! [`proxy::Snapshot`]; the request path only reads it. See `docs/architecture.md`.
//!
//! Modules, in the order a request meets them:
//! - [`config`]: the YAML model, `${ENV}` interpolation, validation with `FILE:LINE:COL` errors;
//! - [`proxy`]: snapshot compile, listeners, connection handling, the request handler, reload;
//! - [`route`]: path normalisation, patterns and the precedence-ordered route table;
//! - [`policy`]: the per-route policy chain (authentication, authorization, rate limits);
//! - [`upstream`]: pools, load balancing, health, retries;
//! - [`compose`]: request composition (parallel and dependent upstream calls merged as JSON);
//! - [`cache`]: the response cache (RFC 9111 freshness, per-identity entries, coalescing);
//! - [`compression`]: response compression by `Accept-Encoding` (gzip, brotli, zstd), streamed;
//! - [`store`]: state shared by replicas (Redis);
//! - [`pipeline`]: the shared request vocabulary (context, bodies, errors → responses);
//! - [`telemetry`]: logging and the access log; [`admin`]: the admin API;
//! - [`demo`]: the embedded demo (config and upstream) behind `portcullis demo`;
//! - [`explain`]: `portcullis explain`, a decision and its reasons from the config alone.

// the request future nests deeply (policies → shared stores → Redis cluster routing)
#![recursion_limit = "256"]

pub mod admin;
pub mod cache;
pub mod compose;
pub mod compression;
pub mod config;
pub mod demo;
pub mod explain;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod upstream;
