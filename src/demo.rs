//! `portcullis demo`: the gateway with an embedded config and a built-in backend, so the product
//! can be tried with no file and no other service.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::config::{self, ConfigErrors, LoadedConfig};

/// The demo's config (also `examples/demo.yaml`).
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.yaml");

/// Loads the embedded config with the backend, listener and admin addresses filled in.
pub fn load_config(
    upstream: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<LoadedConfig, ConfigErrors> {
    let values = [
        ("DEMO_UPSTREAM", upstream.to_string()),
        ("DEMO_LISTEN", listen.to_string()),
        ("DEMO_ADMIN", admin.to_string()),
    ];
    let mut loaded = config::load_str(
        DEMO_CONFIG,
        "<demo>".as_ref(),
        PathBuf::new(),
        &move |name| {
            values
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        },
    )?;
    // the demo's substitutions are addresses, not secrets: show them on /config
    loaded.secret_paths.clear();
    Ok(loaded)
}

/// Starts the demo backend: it answers every request with a JSON echo of what it received
/// (method, path, headers), which shows what the gateway forwards. `/healthz` answers `ok`.
pub async fn start_backend(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(echo(&request))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((local, task))
}

fn echo(request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes())
                    .into_owned()
                    .into(),
            )
        })
        .collect();
    let body = serde_json::json!({
        "service": "portcullis-demo-backend",
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "headers_received": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The curl commands printed at start, all of which work against the running demo.
pub fn instructions(public: SocketAddr, admin: Option<SocketAddr>) -> String {
    let mut text = format!(
        "\nPortcullis demo is running. Try:\n\n\
         \x20 curl -s http://{public}/api/hello                # proxied: the backend echoes what it received\n\
         \x20 curl -s http://{public}/health                   # a GET-only public route\n\
         \x20 curl -s -i http://{public}/nope                  # 404 with a JSON error and a request id\n\
         \x20 curl -s --path-as-is http://{public}/api/x/../../api/y  # normalised before routing: the backend sees /y\n\
         \x20 curl -s -i --path-as-is 'http://{public}/api/a%2Fb'     # encoded slash: refused with 400\n"
    );
    if let Some(admin) = admin {
        text.push_str(&format!(
            "\x20 curl -s http://{admin}/readyz                   # admin: readiness\n\
             \x20 curl -s http://{admin}/config                   # admin: the effective config\n"
        ));
    }
    text.push_str("\nStop with Ctrl-C.\n");
    text
}
