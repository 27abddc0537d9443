//! Response compression through the real gateway: each algorithm decodes back to the upstream's
//! body, q-values decide, and the responses that must never be compressed are not.

use std::io::Read;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{config_with, eventually, Reply, TestGateway, TestUpstream};

/// A response with its body as bytes (compressed bodies are not text).
struct Fetched {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn send(request: Request<Full<Bytes>>) -> Fetched {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(20), client.request(request))
            .await
            .expect("response within 20s")
            .expect("request succeeds at the HTTP level");
    let (parts, body) = response.into_parts();
    Fetched {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A JSON body well above the 1 KiB default `min_size`.
fn json_body() -> String {
    let items: Vec<String> = (0..200)
        .map(|i| format!("{{\"id\":{i},\"name\":\"item number {i}\",\"tags\":[\"a\",\"b\"]}}"))
        .collect();
    format!("[{}]", items.join(","))
}

/// Answers by path: `/z/png` an image, `/z/small` a tiny JSON, `/z/encoded` a body the upstream
/// compressed itself, `/z/not-modified` a 304; anything else the big JSON body with a strong
/// ETag and a `Vary` of its own.
async fn upstream() -> TestUpstream {
    TestUpstream::start(|received| {
        let path = received.path_and_query.as_str();
        match path {
            "/z/png" => Reply::ok(&"\u{89}PNG".repeat(1000)).header("content-type", "image/png"),
            "/z/small" => Reply::ok("{\"ok\":true}").header("content-type", "application/json"),
            "/z/encoded" => Reply::ok(&"already gzipped, pretend".repeat(100))
                .header("content-type", "text/plain")
                .header("content-encoding", "gzip"),
            "/z/not-modified" => Reply::status(304)
                .header("etag", "\"v1\"")
                .header("content-type", "application/json"),
            _ => Reply::ok(&json_body())
                .header("content-type", "application/json; charset=utf-8")
                .header("etag", "\"v1\"")
                .header("vary", "Origin"),
        }
    })
    .await
}

const ROUTES: &str = "  - name: zipped\n    match: { path: /z/** }\n    public: true\n    upstream: app\n    compression: {}\n  - name: plain\n    match: { path: /plain/** }\n    public: true\n    upstream: app\n    compression: { enabled: false }\n  - name: gzip-only\n    match: { path: /g/** }\n    public: true\n    upstream: app\n    compression: { algorithms: [gzip], min_size: 20KiB }\n  - name: gzip-any-size\n    match: { path: /g2/** }\n    public: true\n    upstream: app\n    compression: { algorithms: [gzip] }\n";

async fn gateway(upstream: &TestUpstream, access_log: Option<&std::path::Path>) -> TestGateway {
    let mut yaml = config_with(&[upstream.url()], "", ROUTES);
    if let Some(path) = access_log {
        yaml.push_str(&format!(
            "observability:\n  access_log:\n    output: {}\n",
            path.display()
        ));
    }
    TestGateway::start(&yaml).await
}

async fn get(gateway: &TestGateway, path: &str, accept_encoding: Option<&str>) -> Fetched {
    request(gateway, "GET", path, accept_encoding).await
}

async fn request(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    accept_encoding: Option<&str>,
) -> Fetched {
    let mut builder = Request::builder().method(method).uri(gateway.url(path));
    if let Some(value) = accept_encoding {
        builder = builder.header("accept-encoding", value);
    }
    send(builder.body(Full::<Bytes>::default()).unwrap()).await
}

fn encoding(response: &Fetched) -> Option<&str> {
    response
        .headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap())
}

fn vary(response: &Fetched) -> Vec<String> {
    response
        .headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .collect()
}

fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(data).unwrap(),
        other => panic!("unexpected coding {other}"),
    }
    out
}

#[tokio::test]
async fn each_algorithm_decodes_to_the_upstream_body() {
    let upstream = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gateway = gateway(&upstream, Some(&log)).await;
    let original = json_body();
    let mut sizes = Vec::new();
    for coding in ["gzip", "br", "zstd"] {
        let response = get(&gateway, "/z/items", Some(coding)).await;
        assert_eq!(response.status, 200);
        assert_eq!(encoding(&response), Some(coding));
        assert!(!response.headers.contains_key("content-length"));
        assert_eq!(vary(&response), ["origin", "accept-encoding"]);
        assert_eq!(response.headers["etag"], "W/\"v1\"");
        assert!(response.body.len() < original.len() / 4, "{coding}");
        assert_eq!(
            String::from_utf8(decode(coding, &response.body)).unwrap(),
            original,
            "{coding}"
        );
        sizes.push(response.body.len() as u64);
        // the upstream is asked as the client asked (it may compress itself)
        assert_eq!(upstream.last().headers["accept-encoding"], coding);
    }
    // the access log counts the bytes sent: the compressed ones
    assert!(
        eventually(std::time::Duration::from_secs(5), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
                == 3
        })
        .await
    );
    let logged: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["bytes_out"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(logged, sizes);
}

#[tokio::test]
async fn q_values_decide_and_a_refused_coding_is_never_used() {
    let upstream = upstream().await;
    let gateway = gateway(&upstream, None).await;
    let cases = [
        ("gzip;q=0.5, br;q=1", Some("br")),
        ("gzip, br, zstd", Some("zstd")),
        ("gzip;q=1, br;q=0.9, zstd;q=0.8", Some("gzip")),
        ("gzip;q=0", None),
        ("br;q=0, zstd;q=0, *", Some("gzip")),
        ("*;q=0", None),
        ("identity", None),
        ("deflate", None),
    ];
    for (accept, expected) in cases {
        let response = get(&gateway, "/z/items", Some(accept)).await;
        assert_eq!(encoding(&response), expected, "{accept}");
        // compressible either way: caches must know the answer depends on the header
        assert!(
            vary(&response).contains(&"accept-encoding".to_owned()),
            "{accept}"
        );
        if expected.is_none() {
            assert_eq!(response.body, json_body().as_bytes(), "{accept}");
            assert_eq!(response.headers["etag"], "\"v1\"", "{accept}");
        }
    }
    // without the header, identity
    let response = get(&gateway, "/z/items", None).await;
    assert_eq!(encoding(&response), None);
    // a route's offer limits the choice, and its min_size applies
    let response = get(&gateway, "/g/items", Some("br, gzip;q=0.1")).await;
    assert_eq!(encoding(&response), None, "below the route's 20KiB");
    let response = get(&gateway, "/g2/items", Some("br, gzip;q=0.1")).await;
    assert_eq!(
        encoding(&response),
        Some("gzip"),
        "only gzip is offered there"
    );
}

#[tokio::test]
async fn what_must_not_be_compressed_is_sent_as_it_came() {
    let upstream = upstream().await;
    let gateway = gateway(&upstream, None).await;
    let all = Some("gzip, br, zstd");

    let small = get(&gateway, "/z/small", all).await;
    assert_eq!(encoding(&small), None);
    assert_eq!(small.body, "{\"ok\":true}".as_bytes());

    let png = get(&gateway, "/z/png", all).await;
    assert_eq!(encoding(&png), None);
    assert!(!vary(&png).contains(&"accept-encoding".to_owned()));
    assert_eq!(png.body, "\u{89}PNG".repeat(1000).as_bytes());

    let encoded = get(&gateway, "/z/encoded", all).await;
    assert_eq!(
        encoding(&encoded),
        Some("gzip"),
        "the upstream's own coding"
    );
    assert_eq!(
        encoded.body,
        "already gzipped, pretend".repeat(100).as_bytes()
    );

    let head = request(&gateway, "HEAD", "/z/items", all).await;
    assert_eq!(head.status, 200);
    assert_eq!(encoding(&head), None);

    let not_modified = get(&gateway, "/z/not-modified", all).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(encoding(&not_modified), None);
    assert_eq!(not_modified.headers["etag"], "\"v1\"");

    let off = get(&gateway, "/plain/items", all).await;
    assert_eq!(encoding(&off), None);
    assert_eq!(off.body, json_body().as_bytes());

    let ranged = send(
        Request::get(gateway.url("/z/items"))
            .header("accept-encoding", "gzip")
            .header("range", "bytes=0-99")
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(encoding(&ranged), None);
}

#[tokio::test]
async fn a_listener_setting_applies_to_routes_without_their_own() {
    let upstream = upstream().await;
    let yaml = config_with(
        &[upstream.url()],
        "",
        "  - name: all\n    public: true\n    upstream: app\n",
    )
    .replacen(
        "    bind: 127.0.0.1:0\n",
        "    bind: 127.0.0.1:0\n    compression: { algorithms: [br] }\n",
        1,
    );
    let gateway = TestGateway::start(&yaml).await;
    let response = get(&gateway, "/items", Some("gzip, br")).await;
    assert_eq!(encoding(&response), Some("br"));
    assert_eq!(decode("br", &response.body), json_body().as_bytes());
}
