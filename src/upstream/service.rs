//! A client for the gateway's own calls to one service endpoint (token introspection, external
//! policy services): a pooled connection, JSON answers, bounded reads. Timeouts are the caller's,
//! as each caller fails in its own way.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, uri::Authority, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};

use super::{ClientSettings, ConnectionPool, TargetScheme};
use crate::pipeline::UpstreamBody;

/// Largest answer read from a service.
const MAX_ANSWER: usize = 64 * 1024;

/// One HTTP(S) endpoint and its connection pool.
pub struct ServiceEndpoint {
    endpoint: Uri,
    authority: Authority,
    pool: Arc<ConnectionPool>,
}

impl std::fmt::Debug for ServiceEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServiceEndpoint")
            .field(&self.endpoint)
            .finish()
    }
}

impl ServiceEndpoint {
    /// `https://…`, or `http://…` to a loopback address only (credentials and decisions do not
    /// cross a network in the clear).
    pub fn from_url(url: &str, connect_timeout: Duration) -> Result<Self, String> {
        // the URL is not echoed: some carry a secret (chat webhooks)
        let endpoint: Uri = url.parse().map_err(|_| "not a URL".to_owned())?;
        let host = endpoint.host().ok_or("the URL needs a host")?;
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let (scheme, port) = match endpoint.scheme_str() {
            Some("https") => (TargetScheme::Https, 443),
            Some("http") if loopback => (TargetScheme::Http1, 80),
            _ => {
                return Err("the URL must be https:// (http:// only to a loopback address)".into())
            }
        };
        let authority: Authority = format!("{host}:{}", endpoint.port_u16().unwrap_or(port))
            .parse()
            .map_err(|_| "bad host in the URL".to_owned())?;
        let tls = crate::tls::client_config(None, None).map_err(|e| e.to_string())?;
        let pool = Arc::new(ConnectionPool::new(
            ClientSettings {
                scheme,
                tls: Arc::new(tls),
                tls_fingerprint: String::new(),
                server_name: None,
                connect_timeout,
                max_idle: 16,
                idle_timeout: Duration::from_secs(30),
            },
            1,
        ));
        Ok(Self {
            endpoint,
            authority,
            pool,
        })
    }

    /// `POST`s `body` and reads a JSON object back; the error says which step failed.
    pub async fn post_for_json(
        &self,
        content_type: &'static str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Map<String, Value>, &'static str> {
        let bytes = self.post(content_type, headers, body).await?;
        serde_json::from_slice(&bytes).map_err(|_| "the answer is not a JSON object")
    }

    /// `POST`s `body` and reads the (bounded) answer of a 2xx response.
    pub async fn post(
        &self,
        content_type: &'static str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Bytes, &'static str> {
        let mut request = Request::new(UpstreamBody::Full(Some(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.clone();
        let request_headers = request.headers_mut();
        request_headers.insert(
            header::HOST,
            HeaderValue::from_str(self.authority.as_str()).map_err(|_| "bad host")?,
        );
        request_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        request_headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            request_headers.insert(name.clone(), value.clone());
        }
        let response = self
            .pool
            .send(&self.authority, request)
            .await
            .map_err(|_| "the service could not be reached")?;
        if !response.status().is_success() {
            return Err("the service answered with an error status");
        }
        Ok(Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|_| "the answer could not be read")?
            .to_bytes())
    }
}
