//! Integration tests: the real gateway on loopback, real upstreams, real sockets.
//! One test binary (faster to build and link than one per file).

mod support;

mod authn;
mod authz;
mod caching;
mod cli;
mod composition;
mod compression;
mod grpc;
mod hardening;
mod http3;
mod lifecycle;
mod observability;
mod ratelimit;
mod restart;
mod routing;
mod shared_state;
mod tls;
mod upstreams;
mod websocket;
