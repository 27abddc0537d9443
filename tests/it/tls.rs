//! TLS on both sides, with certificates generated per test (rcgen): SNI certificate selection,
//! ALPN HTTP/2, the TLS 1.3-only setting, upstream TLS with a private CA, SNI override and a
//! client certificate, and WebSocket upgrades to an HTTPS upstream (ALPN `http/1.1` only).

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::support::*;

struct Pki {
    ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        Self {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    /// Writes `NAME.pem` and `NAME.key` for a leaf with these DNS names; returns the leaf's DER.
    fn leaf(&self, dir: &Path, name: &str, dns: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    fn client_config(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    sni: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

fn tls_listener_config(upstream: &TestUpstream, dir: &Path, extra: &str) -> String {
    let yaml = config_with(&[upstream.url()], "", CATCH_ALL);
    let _ = dir;
    yaml.replace(
        "    bind: 127.0.0.1:0\n",
        &format!(
            "    bind: 127.0.0.1:0\n    tls:\n{extra}      certificates:\n        - {{ cert: api.pem, key: api.key, server_names: [api.example.test] }}\n        - {{ cert: internal.pem, key: internal.key, server_names: [\"*.internal.example.test\"] }}\n"
        ),
    )
}

async fn start_tls_gateway(extra: &str) -> (Pki, Vec<u8>, Vec<u8>, TestUpstream, TestGateway) {
    let pki = Pki::new();
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let api = pki.leaf(dir.path(), "api", &["api.example.test"]);
    let internal = pki.leaf(dir.path(), "internal", &["*.internal.example.test"]);
    let yaml = tls_listener_config(&upstream, dir.path(), extra);
    let loaded = load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    let test_gateway = TestGateway {
        gateway: Some(gateway),
        addr,
        dir,
    };
    (pki, api, internal, upstream, test_gateway)
}

fn peer_leaf(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test]
async fn sni_selects_the_certificate_and_unknown_names_get_the_default() {
    let (pki, api, internal, _upstream, gateway) = start_tls_gateway("").await;
    let versions = rustls::DEFAULT_VERSIONS;
    let stream = tls_connect(
        gateway.addr,
        "api.example.test",
        pki.client_config(&[b"http/1.1"], versions),
    )
    .await
    .unwrap();
    assert_eq!(peer_leaf(&stream).as_ref(), api.as_slice());
    let stream = tls_connect(
        gateway.addr,
        "db.internal.example.test",
        pki.client_config(&[b"http/1.1"], versions),
    )
    .await
    .unwrap();
    assert_eq!(peer_leaf(&stream).as_ref(), internal.as_slice());
    // an unknown name gets the default (first) certificate, which the client then rejects
    let error = tls_connect(
        gateway.addr,
        "other.example.test",
        pki.client_config(&[b"http/1.1"], versions),
    )
    .await;
    assert!(
        error.is_err(),
        "certificate for another name must not verify"
    );
}

#[tokio::test]
async fn http2_is_negotiated_with_alpn_and_proxies() {
    let (pki, _, _, upstream, gateway) = start_tls_gateway("").await;
    let stream = tls_connect(
        gateway.addr,
        "api.example.test",
        pki.client_config(&[b"h2", b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("https://api.example.test/tls-path")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"upstream saw /tls-path");
    assert_eq!(upstream.last().headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn a_tls13_only_listener_refuses_tls12_clients() {
    let (pki, _, _, _upstream, gateway) = start_tls_gateway("      min_version: \"1.3\"\n").await;
    let old = tls_connect(
        gateway.addr,
        "api.example.test",
        pki.client_config(&[], &[&rustls::version::TLS12]),
    )
    .await;
    assert!(old.is_err(), "TLS 1.2 must be refused");
    let new = tls_connect(
        gateway.addr,
        "api.example.test",
        pki.client_config(&[], &[&rustls::version::TLS13]),
    )
    .await;
    assert!(new.is_ok());
}

/// A TLS upstream requiring a client certificate signed by the test CA.
async fn start_mtls_upstream(pki: &Pki, dir: &Path) -> std::net::SocketAddr {
    pki.leaf(dir, "upstream", &["upstream.internal.test"]);
    let chain = portcullis::tls::load_certs(&dir.join("upstream.pem")).unwrap();
    let key = portcullis::tls::load_key(&dir.join("upstream.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        portcullis::tls::provider(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"hello over mTLS"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstreams_are_verified_with_a_private_ca_and_get_a_client_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    pki.leaf(dir.path(), "gateway-client", &["gateway.internal.test"]);
    let upstream = start_mtls_upstream(&pki, dir.path()).await;
    let target = format!("https://{upstream}");
    let with_client_cert = config_with(
        std::slice::from_ref(&target),
        "    tls: { ca: ca.pem, server_name: upstream.internal.test, client_cert: gateway-client.pem, client_key: gateway-client.key }\n",
        CATCH_ALL,
    );
    let gateway =
        portcullis::proxy::Gateway::start(&load_yaml(&with_client_cert, dir.path()), Some(1))
            .unwrap();
    let addr = gateway.local_addr("main").unwrap();
    let response = send(
        Request::get(format!("http://{addr}/"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "hello over mTLS")
    );
    drop(gateway);

    // without the client certificate, or with the wrong server name, the upstream is not reached
    for tls in [
        "    tls: { ca: ca.pem, server_name: upstream.internal.test }\n",
        "    tls: { ca: ca.pem, server_name: wrong.internal.test, client_cert: gateway-client.pem, client_key: gateway-client.key }\n",
        "    tls: { server_name: upstream.internal.test, client_cert: gateway-client.pem, client_key: gateway-client.key }\n",
    ] {
        let yaml = config_with(std::slice::from_ref(&target), &format!("{tls}    retries: {{ max_retries: 0 }}\n"), CATCH_ALL);
        let gateway = portcullis::proxy::Gateway::start(&load_yaml(&yaml, dir.path()), Some(1)).unwrap();
        let addr = gateway.local_addr("main").unwrap();
        let response = send(Request::get(format!("http://{addr}/")).body(Full::default()).unwrap()).await;
        assert_eq!(response.status, 502, "{tls}: {}", response.body);
    }
}

/// A client certificate (and key) for a SPIFFE-style URI identity, signed by `pki`.
fn client_identity(
    pki: &Pki,
    uri: &str,
) -> (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client");
    let cert = params.signed_by(&key, &pki.ca, &pki.ca_key).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (vec![cert.der().clone()], der)
}

async fn https_get(
    addr: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    path: &str,
    authorization: Option<&str>,
) -> std::io::Result<(u16, http::HeaderMap)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let stream = tls_connect(addr, "api.example.test", config).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", "api.example.test");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = sender
        .send_request(request.body(Full::<Bytes>::default()).unwrap())
        .await
        .map_err(std::io::Error::other)?;
    Ok((response.status().as_u16(), response.headers().clone()))
}

#[tokio::test]
async fn client_certificates_authenticate_and_bind_tokens() {
    use crate::support::tokens::{claims, jwks, Signer};
    let pki = Pki::new();
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(dir.path(), "api", &["api.example.test"]);
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let signer = Signer::ec("bind");
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&signer])).unwrap();
    let yaml = config_with(
        &[upstream.url()],
        "",
        "  - name: svc\n    match: { path: /svc }\n    auth: [services]\n    authorization:\n      any_authenticated: true\n    upstream: app\n  - name: bound\n    match: { path: /bound }\n    auth: [corp]\n    authorization:\n      any_authenticated: true\n    upstream: app\n",
    )
    .replace(
        "    bind: 127.0.0.1:0\n",
        "    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        - { cert: api.pem, key: api.key }\n      client_auth: { ca: ca.pem }\n",
    ) + "authentication:\n  mtls:\n    - name: services\n      allow: [\"spiffe://prod.test/*\"]\n      roles: { \"spiffe://prod.test/billing\": [billing] }\n  jwt:\n    - name: corp\n      algorithms: [ES256]\n      keys: { jwks_file: jwks.json }\n";
    let loaded = load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();

    let billing = client_identity(&pki, "spiffe://prod.test/billing");
    let (status, _) = https_get(addr, &pki, Some(billing), "/svc", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-auth-subject"], "spiffe://prod.test/billing");
    assert_eq!(seen["x-auth-method"], "mtls");
    assert_eq!(seen["x-auth-roles"], "billing");

    let (status, headers) = https_get(addr, &pki, None, "/svc", None).await.unwrap();
    assert_eq!(status, 401, "no certificate");
    assert_eq!(
        headers["www-authenticate"],
        "ClientCertificate realm=\"portcullis\""
    );
    let outsider = client_identity(&pki, "spiffe://staging.test/billing");
    assert_eq!(
        https_get(addr, &pki, Some(outsider), "/svc", None)
            .await
            .unwrap()
            .0,
        401,
        "not allowed"
    );
    // a certificate from another CA does not even complete the handshake
    let stranger = Pki::new();
    assert!(https_get(
        addr,
        &pki,
        Some(client_identity(&stranger, "spiffe://prod.test/billing")),
        "/svc",
        None
    )
    .await
    .is_err());

    // a token bound to a certificate (RFC 8705) works only with that certificate
    let (chain, key) = client_identity(&pki, "spiffe://prod.test/web");
    let thumbprint =
        crate::support::tokens::b64(&portcullis::policy::authn::sha256(chain[0].as_ref()));
    let mut bound = claims("web-user");
    bound["cnf"] = serde_json::json!({ "x5t#S256": thumbprint });
    let token = format!("Bearer {}", signer.sign(&bound));
    let (status, _) = https_get(addr, &pki, Some((chain, key)), "/bound", Some(&token))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let other = client_identity(&pki, "spiffe://prod.test/web");
    assert_eq!(
        https_get(addr, &pki, Some(other), "/bound", Some(&token))
            .await
            .unwrap()
            .0,
        401,
        "another certificate"
    );
    assert_eq!(
        https_get(addr, &pki, None, "/bound", Some(&token))
            .await
            .unwrap()
            .0,
        401,
        "no certificate"
    );
    drop(gateway);
}

/// A TLS WebSocket echo server offering `h2` and `http/1.1` by ALPN; records what each
/// connection negotiated.
async fn start_tls_websocket_upstream(
    pki: &Pki,
    dir: &Path,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>,
) {
    use futures_util::{SinkExt, StreamExt};
    pki.leaf(dir, "ws-upstream", &["ws.internal.test"]);
    let chain = portcullis::tls::load_certs(&dir.join("ws-upstream.pem")).unwrap();
    let key = portcullis::tls::load_key(&dir.join("ws-upstream.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let negotiated = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = negotiated.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, negotiated)
}

#[tokio::test]
async fn websocket_upgrades_to_https_upstreams_offer_only_http1() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let (upstream, negotiated) = start_tls_websocket_upstream(&pki, dir.path()).await;
    let yaml = config_with(
        &[format!("https://{upstream}")],
        "    tls: { ca: ca.pem, server_name: ws.internal.test }\n",
        "  - name: ws\n    public: true\n    websocket: true\n    upstream: app\n",
    );
    let gateway =
        portcullis::proxy::Gateway::start(&load_yaml(&yaml, dir.path()), Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{addr}/socket"))
        .await
        .expect("the upgrade succeeds over a TLS upstream");
    assert_eq!(response.status(), 101);
    ws.send(Message::text("over TLS")).await.unwrap();
    let echoed = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("over TLS"));
    // the upstream would have chosen h2 had it been offered
    assert_eq!(
        *negotiated.lock().unwrap(),
        [Some(b"http/1.1".to_vec())],
        "the upgrade's connection offered only http/1.1"
    );
}
