//! HTTP/3 (QUIC) beside a TLS listener: a real HTTP/3 client (quinn + h3) against the gateway,
//! requests that reach a real upstream through the shared request path (routes, policies, body
//! limits, client certificates, access log), the TCP listener's `Alt-Svc` advertisement, draining
//! on shutdown, reload, and the config error for HTTP/3 without TLS.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::ServerName;

use crate::support::*;

const API_KEY: &str = "h3-partner-key";
const SERVER_NAME: &str = "api.example.test";

/// A private CA (written as `ca.pem` into `dir`, for client certificates too) and one leaf for
/// [`SERVER_NAME`], written as `api.pem`/`api.key`.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let pki = Self { ca, ca_key };
        pki.issue_leaf(dir);
        pki
    }

    /// Writes a new `api.pem`/`api.key` for [`SERVER_NAME`]; returns the certificate.
    fn issue_leaf(&self, dir: &Path) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .unwrap()
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap();
        std::fs::write(dir.join("api.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("api.key"), key.serialize_pem()).unwrap();
        leaf.der().to_vec()
    }

    /// A client config trusting the CA, TLS 1.3, with this ALPN protocol.
    fn client_config(&self, alpn: &[u8]) -> rustls::ClientConfig {
        self.client_config_as(alpn, None)
    }

    /// The same, presenting a client certificate for this URI identity when given one.
    fn client_config_as(&self, alpn: &[u8], identity: Option<&str>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some(uri) => {
                let key = KeyPair::generate().unwrap();
                let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
                params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
                let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
                let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
                builder
                    .with_client_auth_cert(vec![cert.der().clone()], key)
                    .unwrap()
            }
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }
}

/// The gateway's config: listener `main` on `port` (0: any) with TLS and `http3` (as given), a
/// public route `/open` and an API-key route `/secure`, the access log in `log`.
fn yaml(upstream: &TestUpstream, port: u16, http3: &str, log: &Path) -> String {
    let routes = "  - name: open\n    match: { path: /open/** }\n    public: true\n    upstream: app\n\
                  \x20 - name: small\n    match: { path: /small/** }\n    public: true\n    max_body: 1KiB\n    upstream: app\n\
                  \x20 - name: secure\n    match: { path: /secure/** }\n    auth: [keys]\n    authorization: { any_authenticated: true }\n    upstream: app\n";
    format!(
        "{}authentication:\n  api_keys:\n    - name: keys\n      keys:\n        - {{ id: alice, sha256: {} }}\nobservability:\n  access_log:\n    output: {}\n",
        config_with(&[upstream.url()], "", routes),
        digest(API_KEY),
        log.display(),
    )
    .replacen(
        "    bind: 127.0.0.1:0\n",
        &format!(
            "    bind: 127.0.0.1:{port}\n    tls:\n      certificates:\n        - {{ cert: api.pem, key: api.key }}\n{http3}"
        ),
        1,
    )
}

struct Setup {
    pki: Pki,
    upstream: TestUpstream,
    gateway: TestGateway,
    log: std::path::PathBuf,
}

async fn setup(http3: &str) -> Setup {
    setup_with(TestUpstream::echo().await, 0, http3).await
}

async fn setup_with(upstream: TestUpstream, port: u16, http3: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let log = dir.path().join("access.log");
    let loaded = load_yaml(&yaml(&upstream, port, http3, &log), dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    Setup {
        pki,
        upstream,
        gateway: TestGateway {
            gateway: Some(gateway),
            addr,
            dir,
        },
        log,
    }
}

impl Setup {
    fn http3_addr(&mut self) -> SocketAddr {
        self.gateway
            .gateway()
            .http3_addr("main")
            .expect("listener `main` serves HTTP/3")
    }

    async fn client(&mut self) -> H3Client {
        let addr = self.http3_addr();
        H3Client::connect(addr, self.pki.client_config(b"h3")).await
    }
}

/// An HTTP/3 client connection.
struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

struct H3Response {
    status: u16,
    head: Response<()>,
    body: String,
}

impl H3Client {
    async fn connect(addr: SocketAddr, config: rustls::ClientConfig) -> Self {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connection = endpoint
            .connect(addr, SERVER_NAME)
            .unwrap()
            .await
            .expect("QUIC handshake");
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
            .await
            .expect("HTTP/3 connection");
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        Self {
            send,
            connection,
            endpoint,
        }
    }

    /// The certificate the gateway presented.
    fn server_certificate(&self) -> Vec<u8> {
        let chain = self
            .connection
            .peer_identity()
            .unwrap()
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .unwrap();
        chain[0].to_vec()
    }

    async fn request(
        &mut self,
        request: Request<()>,
        body: Option<&[u8]>,
    ) -> Result<H3Response, h3::error::StreamError> {
        self.request_ending_after(request, body, Duration::ZERO)
            .await
    }

    /// Sends the request, ending its stream `delay` after the last byte (in a packet of its own).
    async fn request_ending_after(
        &mut self,
        request: Request<()>,
        body: Option<&[u8]>,
        delay: Duration,
    ) -> Result<H3Response, h3::error::StreamError> {
        let mut stream = self.send.send_request(request).await?;
        if let Some(body) = body {
            // in two frames, so the gateway has to stream it
            let (first, rest) = body.split_at(body.len() / 2);
            stream.send_data(Bytes::copy_from_slice(first)).await?;
            stream.send_data(Bytes::copy_from_slice(rest)).await?;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        stream.finish().await?;
        let head = stream.recv_response().await?;
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        Ok(H3Response {
            status: head.status().as_u16(),
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> H3Response {
        let mut request = Request::get(format!("https://{SERVER_NAME}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.request(request.body(()).unwrap(), None)
            .await
            .expect("HTTP/3 GET")
    }
}

impl Drop for H3Client {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"");
    }
}

/// The access-log records of `path`, once `count` of them were written.
async fn logged(log: &Path, path: &str, count: usize) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    eventually(Duration::from_secs(3), || {
        records = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|record| record["path"] == path)
            .collect();
        records.len() >= count
    })
    .await;
    records
}

#[tokio::test]
async fn get_and_post_reach_the_upstream_over_http3() {
    let mut setup = setup("    http3: true\n").await;
    let mut client = setup.client().await;

    let response = client.get("/open/items?page=2", &[]).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "upstream saw /open/items?page=2");
    assert!(response.head.headers().contains_key("x-request-id"));
    // the QUIC listener does not advertise itself
    assert!(!response.head.headers().contains_key("alt-svc"));
    let seen = setup.upstream.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.headers["host"], SERVER_NAME);
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(
        !seen.headers.contains_key("transfer-encoding") && seen.body.is_empty(),
        "a GET without a body goes upstream without one: {:?}",
        seen.headers
    );
    // also when the end of the stream comes in a later packet than the head (a DELETE: hyper
    // itself sends a GET with a body of unknown length without one)
    let late_end = client
        .request_ending_after(
            Request::delete(format!("https://{SERVER_NAME}/open/late-end"))
                .body(())
                .unwrap(),
            None,
            Duration::from_millis(100),
        )
        .await
        .expect("HTTP/3 GET");
    assert_eq!(late_end.status, 200);
    let seen = setup.upstream.last();
    assert_eq!(seen.path_and_query, "/open/late-end");
    assert_eq!(seen.method, "DELETE");
    assert!(
        !seen.headers.contains_key("transfer-encoding"),
        "{:?}",
        seen.headers
    );

    let payload = b"{\"order\": 42, \"note\": \"sent over QUIC\"}";
    for declared in [true, false] {
        let mut request = Request::post(format!("https://{SERVER_NAME}/open/orders"))
            .header("content-type", "application/json");
        if declared {
            request = request.header("content-length", payload.len());
        }
        let response = client
            .request(request.body(()).unwrap(), Some(payload))
            .await
            .expect("HTTP/3 POST");
        assert_eq!(response.status, 200, "{}", response.body);
        let seen = setup.upstream.last();
        assert_eq!(seen.method, "POST");
        assert_eq!(&seen.body[..], payload, "declared length: {declared}");
        assert_eq!(seen.headers["content-type"], "application/json");
    }

    // one access-log record per request, protocol HTTP/3, over TLS 1.3
    let records = logged(&setup.log, "/open/orders", 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        assert_eq!(record["protocol"], "HTTP/3", "{record}");
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["method"], "POST", "{record}");
        assert_eq!(record["tls_version"], "TLSv1.3", "{record}");
    }
    assert_eq!(logged(&setup.log, "/open/items", 1).await.len(), 1);
}

/// `GET path` on a connection's request sender; the status.
async fn status_of_get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    path: &str,
) -> u16 {
    let request = Request::get(format!("https://{SERVER_NAME}{path}"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(request).await.expect("request sent");
    stream.finish().await.unwrap();
    let status = stream.recv_response().await.unwrap().status().as_u16();
    while stream.recv_data().await.unwrap().is_some() {}
    status
}

#[tokio::test]
async fn max_streams_caps_the_requests_in_flight_on_one_connection() {
    let delay = Duration::from_millis(500);
    for (max_streams, serial) in [(1, true), (4, false)] {
        let upstream = TestUpstream::start(move |_| Reply::ok("slow").delayed(delay)).await;
        let http3 = format!("    http3: {{ max_streams: {max_streams} }}\n");
        let mut setup = setup_with(upstream, 0, &http3).await;
        let client = setup.client().await;
        let (mut a, mut b) = (client.send.clone(), client.send.clone());
        let started = std::time::Instant::now();
        let statuses = tokio::join!(
            status_of_get(&mut a, "/open/a"),
            status_of_get(&mut b, "/open/b")
        );
        assert_eq!(statuses, (200, 200));
        let elapsed = started.elapsed();
        assert_eq!(
            elapsed >= delay * 2,
            serial,
            "max_streams {max_streams}: both requests took {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn policies_apply_over_http3() {
    let mut setup = setup("    http3: true\n").await;
    let mut client = setup.client().await;
    let refused = client.get("/secure/report", &[]).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(setup.upstream.hits(), 0, "refused before the upstream");
    let allowed = client
        .get("/secure/report", &[("x-api-key", API_KEY)])
        .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert_eq!(setup.upstream.hits(), 1);
    assert_eq!(setup.upstream.last().headers.get("x-api-key"), None);
    let unrouted = client.get("/nowhere", &[]).await;
    assert_eq!(unrouted.status, 404);

    // the body limit, declared or found while streaming
    let large = vec![b'x'; 4096];
    for declared in [true, false] {
        let mut request = Request::post(format!("https://{SERVER_NAME}/small/upload"));
        if declared {
            request = request.header("content-length", large.len());
        }
        let response = client
            .request(request.body(()).unwrap(), Some(&large))
            .await
            .expect("HTTP/3 POST");
        assert_eq!(
            response.status, 413,
            "declared: {declared}: {}",
            response.body
        );
    }
    assert_eq!(
        setup.upstream.hits(),
        1,
        "nothing more reached the upstream"
    );
}

#[tokio::test]
async fn client_certificates_authenticate_over_http3() {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let yaml = yaml(&upstream, 0, "    http3: true\n", &dir.path().join("access.log"))
        .replacen(
            "        - { cert: api.pem, key: api.key }\n",
            "        - { cert: api.pem, key: api.key }\n      client_auth: { ca: ca.pem }\n",
            1,
        )
        .replacen(
            "authentication:\n",
            "authentication:\n  mtls:\n    - name: services\n      allow: [\"spiffe://prod.test/*\"]\n",
            1,
        )
        .replacen(
            "routes:\n",
            "routes:\n  - name: svc\n    match: { path: /svc }\n    auth: [services]\n    authorization: { any_authenticated: true }\n    upstream: app\n",
            1,
        );
    let gateway =
        portcullis::proxy::Gateway::start(&load_yaml(&yaml, dir.path()), Some(1)).unwrap();
    let addr = gateway.http3_addr("main").unwrap();

    let mut billing = H3Client::connect(
        addr,
        pki.client_config_as(b"h3", Some("spiffe://prod.test/billing")),
    )
    .await;
    let response = billing.get("/svc", &[]).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-auth-subject"], "spiffe://prod.test/billing");
    assert_eq!(seen["x-auth-method"], "mtls");

    let mut anonymous = H3Client::connect(addr, pki.client_config(b"h3")).await;
    assert_eq!(
        anonymous.get("/svc", &[]).await.status,
        401,
        "no certificate"
    );
    let mut outsider = H3Client::connect(
        addr,
        pki.client_config_as(b"h3", Some("spiffe://staging.test/billing")),
    )
    .await;
    assert_eq!(outsider.get("/svc", &[]).await.status, 401, "not allowed");
    assert_eq!(upstream.hits(), 1);
    drop(gateway);
}

/// `GET /open/a` over TLS on TCP (HTTP/1.1); returns the response's headers.
async fn tcp_get(setup: &Setup) -> http::HeaderMap {
    let tcp = tokio::net::TcpStream::connect(setup.gateway.addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(setup.pki.client_config(b"http/1.1")))
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("/open/a")
                .header("host", SERVER_NAME)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let _ = response.into_body().collect().await;
    headers
}

#[tokio::test]
async fn the_tls_listener_advertises_http3_with_alt_svc() {
    let mut default = setup("    http3: true\n").await;
    let port = default.http3_addr().port();
    assert_eq!(port, default.gateway.addr.port(), "UDP on the TCP port");
    let headers = tcp_get(&default).await;
    assert_eq!(
        headers["alt-svc"],
        format!("h3=\":{port}\"; ma=86400").as_str()
    );

    let mut tuned = setup("    http3: { advertise_max_age: 1h, max_streams: 8 }\n").await;
    let port = tuned.http3_addr().port();
    assert_eq!(
        tcp_get(&tuned).await["alt-svc"],
        format!("h3=\":{port}\"; ma=3600").as_str()
    );

    let mut silent = setup("    http3: { advertise_max_age: 0s }\n").await;
    assert!(silent.http3_addr().port() > 0);
    assert!(!tcp_get(&silent).await.contains_key("alt-svc"));

    let mut off = setup("    http3: { enabled: false }\n").await;
    assert!(off.gateway.gateway().http3_addr("main").is_none());
    assert!(!tcp_get(&off).await.contains_key("alt-svc"));
}

#[tokio::test]
async fn a_request_in_flight_finishes_when_the_gateway_shuts_down() {
    // large enough to still be in flight when the request ends at the gateway
    let answer = "slow answer ".repeat(64 * 1024);
    let upstream = {
        let answer = answer.clone();
        TestUpstream::start(move |_| Reply::ok(&answer).delayed(Duration::from_millis(600))).await
    };
    let mut setup = setup_with(upstream, 0, "    http3: true\n").await;
    let mut client = setup.client().await;
    let request = tokio::spawn(async move {
        let response = client.get("/open/slow", &[]).await;
        (response.status, response.body)
    });
    assert!(eventually(Duration::from_secs(3), || setup.upstream.hits() == 1).await);
    let gateway = setup.gateway.gateway.take().unwrap();
    let cut = gateway.shutdown().await;
    assert_eq!(cut, 0, "the QUIC connection drained");
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200);
    assert!(body == answer, "{} of {} bytes", body.len(), answer.len());
}

#[tokio::test]
async fn connections_still_open_at_the_shutdown_deadline_are_closed() {
    let upstream =
        TestUpstream::start(|_| Reply::ok("too late").delayed(Duration::from_secs(5))).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let yaml = yaml(
        &upstream,
        0,
        "    http3: true\n",
        &dir.path().join("access.log"),
    )
    .replacen("shutdown_timeout: 5s", "shutdown_timeout: 200ms", 1);
    let gateway =
        portcullis::proxy::Gateway::start(&load_yaml(&yaml, dir.path()), Some(1)).unwrap();
    let mut client = H3Client::connect(
        gateway.http3_addr("main").unwrap(),
        pki.client_config(b"h3"),
    )
    .await;
    let request = tokio::spawn(async move {
        client
            .request(
                Request::get(format!("https://{SERVER_NAME}/open/slow"))
                    .body(())
                    .unwrap(),
                None,
            )
            .await
            .map(|response| response.status)
    });
    assert!(eventually(Duration::from_secs(3), || upstream.hits() == 1).await);
    assert_eq!(gateway.shutdown().await, 1, "cut at the deadline");
    // told at once, not at the client's idle timeout (30 s)
    let outcome = tokio::time::timeout(Duration::from_secs(2), request)
        .await
        .expect("the client learns that its connection was closed")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn reload_switches_http3_on_and_off_and_renews_its_certificate() {
    // a fixed port, so the listener keeps its TCP socket across the reloads
    let port = free_port();
    let mut setup = setup_with(TestUpstream::echo().await, port, "").await;
    assert!(setup.gateway.gateway().http3_addr("main").is_none());
    let on = yaml(&setup.upstream, port, "    http3: true\n", &setup.log);
    let off = yaml(&setup.upstream, port, "", &setup.log);
    setup.gateway.reload(&on).unwrap();
    assert_eq!(setup.http3_addr().port(), port);
    let mut client = setup.client().await;
    assert_eq!(client.get("/open/after-reload", &[]).await.status, 200);
    assert_eq!(
        tcp_get(&setup).await["alt-svc"],
        format!("h3=\":{port}\"; ma=86400").as_str()
    );

    // a renewed certificate reaches new QUIC connections; open ones keep working
    let renewed = setup.pki.issue_leaf(setup.gateway.dir.path());
    assert!(client.server_certificate() != renewed);
    setup.gateway.reload(&on).unwrap();
    assert_eq!(setup.http3_addr().port(), port, "the endpoint stays");
    let mut after = setup.client().await;
    assert!(
        after.server_certificate() == renewed,
        "new QUIC connections get the renewed certificate"
    );
    assert_eq!(after.get("/open/renewed", &[]).await.status, 200);
    assert_eq!(client.get("/open/still-open", &[]).await.status, 200);

    setup.gateway.reload(&off).unwrap();
    assert!(setup.gateway.gateway().http3_addr("main").is_none());
    assert!(!tcp_get(&setup).await.contains_key("alt-svc"));
}

#[test]
fn http3_without_tls_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_with(&["http://127.0.0.1:9".into()], "", CATCH_ALL).replacen(
        "    bind: 127.0.0.1:0\n",
        "    bind: 127.0.0.1:0\n    http3: true\n",
        1,
    );
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let errors = portcullis::config::load_file(&path).expect_err("http3 needs tls");
    let error = errors
        .0
        .iter()
        .find(|e| e.path == "listeners[0].http3")
        .unwrap_or_else(|| panic!("reported on the field: {errors}"));
    let line = yaml
        .lines()
        .position(|l| l.contains("http3: true"))
        .unwrap()
        + 1;
    assert_eq!(error.line, line, "{errors}");
    assert!(error.message.contains("tls"), "{}", error.message);
    assert!(errors.to_string().contains("portcullis.yaml"), "{errors}");
}
