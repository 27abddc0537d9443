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
    admin_api_token: &str,
) -> Result<LoadedConfig, ConfigErrors> {
    let values = [
        ("DEMO_UPSTREAM", upstream.to_string()),
        ("DEMO_LISTEN", listen.to_string()),
        ("DEMO_ADMIN", admin.to_string()),
        ("DEMO_ADMIN_TOKEN", admin_api_token.to_owned()),
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
    // the demo's other substitutions are addresses, not secrets: show them on /config
    loaded.secret_paths.retain(|path| path == "admin.token");
    Ok(loaded)
}

/// The demo's identity provider: a P-256 key made at start, its public JWKS, and two tokens.
pub struct DemoIdentity {
    pub jwks: String,
    /// A token for `demo-user` (role `reader`), valid for one hour.
    pub token: String,
    /// A token for `demo-admin` (role `admin`), valid for one hour.
    pub admin_token: String,
    /// The admin API's bearer token (random, for this run).
    pub admin_api_token: String,
}

impl DemoIdentity {
    pub fn generate() -> Self {
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key generation works");
        let pkcs8 = pair.to_pkcs8v1().expect("a fresh key serialises");
        let point = pair.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "demo-1", "alg": "ES256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]})
        .to_string();
        let now = crate::policy::authn::unix_now();
        let sign = |subject: &str, role: &str| {
            let claims = serde_json::json!({
                "sub": subject, "iss": "portcullis-demo", "aud": "demo-api",
                "iat": now, "nbf": now, "exp": now + 3600, "roles": [role],
            });
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.kid = Some("demo-1".into());
            jsonwebtoken::encode(
                &header,
                &claims,
                &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            )
            .expect("signing works")
        };
        Self {
            jwks,
            token: sign("demo-user", "reader"),
            admin_token: sign("demo-admin", "admin"),
            admin_api_token: {
                let mut bytes = [0u8; 24];
                aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
                b64(&bytes)
            },
        }
    }
}

/// Starts the demo backend: it answers every request with a JSON echo of what it received
/// (method, path, headers), which shows what the gateway forwards. `/healthz` answers `ok`;
/// `/.well-known/jwks.json` publishes the demo identity provider's keys.
pub async fn start_backend(
    addr: SocketAddr,
    jwks: String,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let jwks = jwks.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let jwks = jwks.clone();
                    async move {
                        if request.uri().path() == "/.well-known/jwks.json" {
                            let mut response = Response::new(Full::new(Bytes::from(jwks)));
                            response.headers_mut().insert(
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("application/json"),
                            );
                            return Ok::<_, Infallible>(response);
                        }
                        Ok::<_, Infallible>(echo(&request))
                    }
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
pub fn instructions(
    public: SocketAddr,
    admin: Option<SocketAddr>,
    backend: SocketAddr,
    identity: &DemoIdentity,
) -> String {
    let token = &identity.token;
    let admin_token = &identity.admin_token;
    let mut text = format!(
        "\nPortcullis demo is running. Try:\n\n\
         \x20 curl -s http://{public}/api/hello                # proxied: the backend echoes what it received\n\
         \x20 curl -s http://{public}/health                   # a GET-only public route\n\
         \x20 curl -s -i http://{public}/nope                  # 404 with a JSON error and a request id\n\
         \x20 curl -s --path-as-is http://{public}/api/x/../../api/y  # normalised before routing: the backend sees /y\n\
         \x20 curl -s -i --path-as-is 'http://{public}/api/a%2Fb'     # encoded slash: refused with 400\n\n\
         Zero trust: /secure/** needs a token from the demo identity provider, whose keys are\n\
         published at http://{backend}/.well-known/jwks.json. A token valid for an hour:\n\n\
         \x20 export TOKEN={token}\n\
         \x20 curl -s -H \"Authorization: Bearer $TOKEN\" http://{public}/secure/orders   # allowed: the backend sees x-auth-subject\n\
         \x20 curl -s -i http://{public}/secure/orders                                  # no token: 401 with WWW-Authenticate\n\
         \x20 curl -s -i -H \"Authorization: Bearer ${{TOKEN}}x\" http://{public}/secure/orders  # tampered token: 401\n\
         \x20 curl -s -H 'x-auth-subject: admin' http://{public}/api/whoami              # a forged identity header is stripped\n"
    );
    text.push_str(&format!(
        "\nAuthorization, deny by default: TOKEN carries role `reader` (GET and HEAD on /secure/**);\n\
         ADMIN_TOKEN carries `admin`, which includes `reader` and may also change things:\n\n\
         \x20 export ADMIN_TOKEN={admin_token}\n\
         \x20 curl -s -i -X DELETE -H \"Authorization: Bearer $TOKEN\" http://{public}/secure/orders/7        # reader: 403 forbidden\n\
         \x20 curl -s -X DELETE -H \"Authorization: Bearer $ADMIN_TOKEN\" http://{public}/secure/orders/7     # admin: allowed\n\n"
    ));
    text.push_str(&format!(
        "Rate limits: /limited/** allows 5 requests a minute per client, then answers 429:\n\n\
         \x20 for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' http://{public}/limited/x; done; echo\n\
         \x20 curl -s -i http://{public}/limited/x                # 429, Retry-After, RateLimit-Policy, RateLimit\n\n"
    ));
    if let Some(admin) = admin {
        let admin_api_token = &identity.admin_api_token;
        text.push_str(&format!(
            "Observability: the live dashboard (golden signals, top clients, suspicious and blocked\n\
             clients, upstream health, firing alerts) shows the traffic above as you send it:\n\n\
             \x20 http://{admin}/dashboard#token={admin_api_token}\n\n\
             The admin API needs its token (the demo made one for this run):\n\n\
             \x20 export PORTCULLIS_ADMIN_TOKEN={admin_api_token}\n\
             \x20 curl -s http://{admin}/metrics | grep portcullis_requests_total   # Prometheus, no token needed\n\
             \x20 curl -s -H \"Authorization: Bearer $PORTCULLIS_ADMIN_TOKEN\" http://{admin}/config   # the effective config\n\
             \x20 curl -s -H \"Authorization: Bearer $PORTCULLIS_ADMIN_TOKEN\" http://{admin}/alerts   # firing alerts\n\
             \x20 curl -s http://{admin}/readyz                   # probes need no token\n"
        ));
    }
    text.push_str("\nStop with Ctrl-C.\n");
    text
}
