//! Routing: precedence, matching conditions, normalisation before matching, rewrites.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn routes_yaml() -> &'static str {
    "  - name: catch-all
    match: { path: /** }
    public: true
    upstream: app
  - name: users
    match: { path: /users/** }
    public: true
    upstream: app
    rewrite: { add_prefix: /by-prefix }
  - name: user
    match: { path: \"/users/{id}\" }
    public: true
    upstream: app
    rewrite: { add_prefix: /by-template }
  - name: me
    match: { path: /users/me }
    public: true
    upstream: app
    rewrite: { add_prefix: /exact }
  - name: user-write
    match: { path: \"/users/{id}\", methods: [POST, PUT] }
    public: true
    upstream: app
    rewrite: { add_prefix: /write }
  - name: api-v2
    match:
      path: /api/**
      headers: [{ name: x-api-version, value: \"2\" }]
    public: true
    upstream: app
    rewrite: { strip_prefix: /api, add_prefix: /v2 }
  - name: api
    match: { path: /api/** }
    public: true
    upstream: app
    rewrite: { strip_prefix: /api }
  - name: wildcard-host
    match: { hosts: [\"*.example.test\"], path: /** }
    public: true
    upstream: app
    rewrite: { add_prefix: /wild }
  - name: exact-host
    match: { hosts: [api.example.test], path: /** }
    public: true
    upstream: app
    rewrite: { add_prefix: /exact-host }
"
}

async fn setup() -> (TestUpstream, TestGateway) {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(&[upstream.url()], "", routes_yaml())).await;
    (upstream, gateway)
}

async fn path_seen(
    gateway: &TestGateway,
    upstream: &TestUpstream,
    method: &str,
    host: Option<&str>,
    path: &str,
) -> String {
    let mut request = Request::builder().method(method).uri(gateway.url(path));
    if let Some(host) = host {
        request = request.header("host", host);
    }
    let response = send(request.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(response.status, 200, "{method} {path}: {}", response.body);
    upstream.last().path_and_query
}

#[tokio::test]
async fn most_specific_route_wins_regardless_of_file_order() {
    let (upstream, gateway) = setup().await;
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", None, "/users/me").await,
        "/exact/users/me"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", None, "/users/42").await,
        "/by-template/users/42"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "POST", None, "/users/42").await,
        "/write/users/42"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", None, "/users/42/orders").await,
        "/by-prefix/users/42/orders"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", None, "/other").await,
        "/other"
    );
}

#[tokio::test]
async fn hosts_and_headers_select_routes() {
    let (upstream, gateway) = setup().await;
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", Some("api.example.test"), "/x").await,
        "/exact-host/x"
    );
    assert_eq!(
        path_seen(
            &gateway,
            &upstream,
            "GET",
            Some("API.Example.TEST:443"),
            "/x"
        )
        .await,
        "/exact-host/x"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", Some("www.example.test"), "/x").await,
        "/wild/x"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", Some("example.test"), "/x").await,
        "/x"
    );

    let v2 = send(
        Request::get(gateway.url("/api/orders?limit=5"))
            .header("x-api-version", "2")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(v2.status, 200);
    assert_eq!(upstream.last().path_and_query, "/v2/orders?limit=5");
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", None, "/api/orders?limit=5").await,
        "/orders?limit=5"
    );
    assert_eq!(
        path_seen(&gateway, &upstream, "GET", None, "/api").await,
        "/"
    );
}

#[tokio::test]
async fn unmatched_requests_get_a_json_404_with_a_request_id() {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "",
        "  - name: only\n    match: { path: /only }\n    public: true\n    upstream: app\n",
    ))
    .await;
    let response = gateway.get("/nope").await;
    assert_eq!(response.status, 404);
    assert_eq!(response.headers["content-type"], "application/json");
    let body = response.json();
    assert_eq!(body["error"], "not_found");
    let id = response.headers["x-request-id"].to_str().unwrap();
    assert_eq!(body["request_id"], id);
    assert_eq!(id.len(), 32);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn traversal_shaped_paths_are_normalised_before_routing() {
    let upstream = TestUpstream::echo().await;
    // only /api/** is routed; /admin has no route at all
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "",
        "  - name: api\n    match: { path: /api/** }\n    public: true\n    upstream: app\n",
    ))
    .await;
    for path in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/./../admin/",
        "/api/x/../../admin",
    ] {
        let raw = RawClient::exchange(
            gateway.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status_of(&raw), 404, "{path}: {raw}");
    }
    assert_eq!(upstream.hits(), 0, "no traversal reached the upstream");

    // equivalent spellings reach the upstream in their normal form
    for (path, seen) in [
        ("//api//x", "/api/x"),
        ("/%61pi/x", "/api/x"),
        ("/api/a/../b", "/api/b"),
        ("/api/%7Euser", "/api/~user"),
    ] {
        let raw = RawClient::exchange(
            gateway.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status_of(&raw), 200, "{path}: {raw}");
        assert_eq!(upstream.last().path_and_query, seen);
    }

    // encodings that backends disagree on are refused outright
    for path in [
        "/api/a%2fb",
        "/api/a%5cb",
        "/api/a%00",
        "/api/a\\b",
        "/api/%zz",
    ] {
        let raw = RawClient::exchange(
            gateway.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status_of(&raw), 400, "{path}: {raw}");
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_on_plaintext_listeners() {
    let (upstream, gateway) = setup().await;
    let response = send_h2c(
        Request::get(gateway.url("/users/me"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.version, http::Version::HTTP_2);
    assert_eq!(upstream.last().path_and_query, "/exact/users/me");
    // the upstream is spoken to over HTTP/1.1 regardless
    assert_eq!(upstream.last().version, http::Version::HTTP_11);
}

#[tokio::test]
async fn upstream_host_can_be_kept_set_or_taken_from_the_target() {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "",
        "  - name: keep\n    match: { path: /keep }\n    public: true\n    upstream: app\n\
         \x20 - name: fixed\n    match: { path: /fixed }\n    public: true\n    upstream: app\n    rewrite: { host: internal.svc }\n\
         \x20 - name: target\n    match: { path: /target }\n    public: true\n    upstream: app\n    rewrite: { host_from_target: true }\n",
    ))
    .await;
    let host_seen = |path: &'static str| {
        let gateway = &gateway;
        let upstream = &upstream;
        async move {
            let response = send(
                Request::get(gateway.url(path))
                    .header("host", "public.example")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
            assert_eq!(response.status, 200);
            let last = upstream.last();
            (
                last.headers["host"].to_str().unwrap().to_owned(),
                last.headers["x-forwarded-host"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
        }
    };
    assert_eq!(
        host_seen("/keep").await,
        ("public.example".into(), "public.example".into())
    );
    assert_eq!(
        host_seen("/fixed").await,
        ("internal.svc".into(), "public.example".into())
    );
    assert_eq!(
        host_seen("/target").await,
        (upstream.addr.to_string(), "public.example".into())
    );
}

#[tokio::test]
async fn http2_clients_keep_their_host_through_a_rewrite() {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "",
        "  - name: api\n    match: { path: /api/** }\n    public: true\n    upstream: app\n    rewrite: { strip_prefix: /api }\n",
    ))
    .await;
    let url = format!("http://public.example:{}/api/x//y", gateway.addr.port());
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(FixedAddress(gateway.addr));
    let response = read(
        client
            .request(Request::get(url).body(Full::default()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.path_and_query, "/x/y");
    let expected = format!("public.example:{}", gateway.addr.port());
    assert_eq!(seen.headers["host"], expected.as_str());
    assert_eq!(seen.headers["x-forwarded-host"], expected.as_str());
}

/// Connects every request to one address, whatever host the URL names.
#[derive(Clone)]
struct FixedAddress(std::net::SocketAddr);

impl tower_service::Service<http::Uri> for FixedAddress {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::TcpStream::connect(addr).await?,
            ))
        })
    }
}

#[tokio::test]
async fn path_parameters_cannot_walk_around_a_protected_prefix() {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "",
        "  - name: public\n    match: { path: /public/** }\n    public: true\n    upstream: app\n",
    ))
    .await;
    for path in [
        "/public/..;/admin/x",
        "/public/x;jsessionid=1",
        "/public;x/y",
        "/%2e%2e;/admin/x",
    ] {
        let raw = RawClient::exchange(
            gateway.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status_of(&raw), 400, "{path}: {raw}");
    }
    assert_eq!(upstream.hits(), 0);
    // and framework headers that name another URL never reach the upstream
    let raw = RawClient::exchange(
        gateway.addr,
        b"GET /public/x HTTP/1.1\r\nHost: t\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&raw), 200);
    let seen = upstream.last().headers;
    assert!(!seen.contains_key("x-original-url") && !seen.contains_key("x-rewrite-url"));
}
