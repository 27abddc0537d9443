//! The data plane: compiling the config into a snapshot, accepting and serving connections,
//! handling requests, and the gateway's lifecycle (start, reload, drain).

mod caching;
mod conn;
mod forwarding;
mod gateway;
mod grpc_web;
mod handler;
pub mod handoff;
mod http3;
pub mod reload;
mod server;
pub mod snapshot;
pub mod systemd;
mod upgrade;

pub use conn::head_has_framing_conflict;
pub use forwarding::new_request_id;
pub use gateway::{bind_tcp, Gateway, GatewayState, ReloadError, ReloadSummary, StartError};
pub use grpc_web::decode_grpc_web_text;
pub use snapshot::{compile, Snapshot};
