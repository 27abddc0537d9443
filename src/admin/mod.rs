//! The admin listener: liveness, readiness and the effective config. It binds to loopback by
//! default and is separate from client listeners, so no route can ever reach it.

use std::{convert::Infallible, sync::atomic::Ordering};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    pipeline::{error_response, ResponseBody},
    proxy::{new_request_id, GatewayState},
};

/// Serves the admin API until the task is dropped.
pub async fn serve(listener: TcpListener, state: GatewayState) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(request, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(request: Request<Incoming>, state: &GatewayState) -> Response<ResponseBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
            &new_request_id(),
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/config" => {
            let snapshot = state.snapshot.load();
            let body = serde_json::json!({
                "generation": snapshot.generation,
                "config": snapshot.effective_config,
            });
            let mut response = Response::new(ResponseBody::full(Bytes::from(
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown admin endpoint",
            &new_request_id(),
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
