//! Attacker-shaped traffic: smuggling, malformed and oversize heads, slow clients, forged
//! forwarding headers, hop-by-hop abuse. Sent over raw TCP so nothing tidies it up first.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

async fn gateway_with_limits(limits: &str) -> (TestUpstream, TestGateway) {
    let upstream = TestUpstream::echo().await;
    let yaml = config_with(&[upstream.url()], "", CATCH_ALL).replace(
        "    bind: 127.0.0.1:0\n",
        &format!("    bind: 127.0.0.1:0\n    limits:\n{limits}"),
    );
    let gateway = TestGateway::start(&yaml).await;
    (upstream, gateway)
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let (upstream, gateway) = gateway_with_limits("      max_body: 1MiB\n").await;
    for request in [
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\ntransfer-encoding: chunked\r\ncontent-length: 30\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        let raw = RawClient::exchange(gateway.addr, request.as_bytes());
        assert_eq!(status_of(&raw), 400, "{request:?} -> {raw}");
    }
    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn malformed_heads_are_refused_with_400() {
    let (upstream, gateway) = gateway_with_limits("      max_body: 1MiB\n").await;
    for request in [
        // conflicting Content-Length values
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        // obs-fold (a header continued on the next line)
        "GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n",
        // invalid header name
        "GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        // control character in a header value
        "GET / HTTP/1.1\r\nHost: t\r\nX-Bad: a\x01b\r\n\r\n",
        // transfer-encoding that does not end in chunked
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        // HTTP/1.1 without Host
        "GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
        // two Host headers
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        // garbage request line
        "GET\x00/ HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        let raw = RawClient::exchange(gateway.addr, request.as_bytes());
        assert_eq!(status_of(&raw), 400, "{request:?} -> {raw}");
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn oversize_heads_get_431() {
    let (upstream, gateway) =
        gateway_with_limits("      max_header_bytes: 8KiB\n      max_headers: 20\n").await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    assert_eq!(
        status_of(&RawClient::exchange(gateway.addr, big.as_bytes())),
        431
    );
    let mut many = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        status_of(&RawClient::exchange(gateway.addr, many.as_bytes())),
        431
    );
    assert_eq!(upstream.hits(), 0);
    // a normal request on the same listener still works
    assert_eq!(gateway.get("/ok").await.status, 200);
}

#[tokio::test]
async fn a_client_sending_its_head_slowly_gets_408() {
    let (upstream, gateway) = gateway_with_limits("      header_timeout: 1s\n").await;
    let started = Instant::now();
    let mut client = gateway.raw();
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n");
    // ... and then nothing more, as a slowloris would
    let raw = client.read_to_close();
    assert_eq!(status_of(&raw), 408, "{raw}");
    let waited = started.elapsed();
    // the deadline runs from the accept, including the HTTP/2 preface sniffing on this listener
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_millis(1800),
        "{waited:?}"
    );

    // the same limit applies to a second request on a kept-alive connection
    let mut client = gateway.raw();
    client.send(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&client.read_response()), 200);
    client.send(b"GET /two HTTP/1.1\r\nHo");
    let raw = client.read_to_close();
    assert_eq!(status_of(&raw), 408, "{raw}");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (_upstream, gateway) = gateway_with_limits("      idle_timeout: 400ms\n").await;
    let mut client = gateway.raw();
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&client.read_response()), 200);
    let started = Instant::now();
    let rest = client.read_to_close();
    assert!(rest.is_empty(), "{rest}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (upstream, gateway) = gateway_with_limits("      max_body: 1KiB\n").await;
    let declared = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n{}",
        "x".repeat(2048)
    );
    assert_eq!(
        status_of(&RawClient::exchange(gateway.addr, declared.as_bytes())),
        413
    );
    assert_eq!(upstream.hits(), 0);

    // chunked bodies are counted as they stream
    let chunk = "y".repeat(600);
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    assert_eq!(
        status_of(&RawClient::exchange(gateway.addr, chunked.as_bytes())),
        413
    );

    // within the limit, the body streams through intact
    let response = send(
        Request::post(gateway.url("/"))
            .body(Full::new(Bytes::from("z".repeat(1000))))
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(upstream.last().body.len(), 1000);
}

#[tokio::test]
async fn route_body_limit_is_lower_than_the_listeners() {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "",
        "  - name: small\n    match: { path: /small }\n    public: true\n    upstream: app\n    max_body: 10\n",
    ))
    .await;
    let response = send(
        Request::post(gateway.url("/small"))
            .body(Full::new(Bytes::from("0123456789ab")))
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 413);
    assert_eq!(response.json()["error"], "payload_too_large");
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_cross_the_gateway() {
    let upstream = TestUpstream::start(|_| {
        Reply::ok("x")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "1")
    })
    .await;
    let gateway = TestGateway::start(&config_with(&[upstream.url()], "", CATCH_ALL)).await;
    let raw = RawClient::exchange(
        gateway.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close, X-Client-Hop\r\nX-Client-Hop: 1\r\nKeep-Alive: 5\r\nTE: gzip\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n",
    );
    assert_eq!(status_of(&raw), 200, "{raw}");
    let seen = upstream.last().headers;
    for name in ["x-client-hop", "keep-alive", "te", "proxy-connection"] {
        assert!(!seen.contains_key(name), "{name} reached the upstream");
    }
    assert_eq!(seen["x-kept"], "yes");
    let headers = raw_headers(&raw);
    assert!(!headers.contains_key("x-upstream-hop"), "{raw}");
    assert!(!headers.contains_key("keep-alive"), "{raw}");
    assert_eq!(headers["x-kept"], "1");
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(&[upstream.url()], "", CATCH_ALL)).await;
    let response = send(
        Request::get(gateway.url("/"))
            .header("host", "public.example")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=6.6.6.6")
            .header("x-request-id", "forged-id")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "public.example");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"public.example\""
    );
    assert_ne!(seen["x-request-id"], "forged-id");
    assert_eq!(seen["x-request-id"], response.headers["x-request-id"]);
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_proxy_are_extended() {
    let upstream = TestUpstream::echo().await;
    let yaml = config_with(&[upstream.url()], "", CATCH_ALL)
        .replace("server:\n", "server:\n  trusted_proxies: [127.0.0.0/8]\n");
    let gateway = TestGateway::start(&yaml).await;
    let response = send(
        Request::get(gateway.url("/"))
            .header("x-forwarded-for", "198.51.100.7")
            .header("x-forwarded-proto", "https")
            .header("x-request-id", "edge-123")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-request-id"], "edge-123");
    assert_eq!(response.headers["x-request-id"], "edge-123");
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let (_upstream, gateway) = gateway_with_limits("      max_connections: 2\n").await;
    let mut first = gateway.raw();
    let mut second = gateway.raw();
    first.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    second.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&first.read_response()), 200);
    assert_eq!(status_of(&second.read_response()), 200);
    let raw = RawClient::exchange(
        gateway.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw, "", "the third connection is closed without an answer");
    drop(first);
    // once a slot frees up, new connections are served again
    let ok = eventually(Duration::from_secs(5), || {
        status_of(&RawClient::exchange(
            gateway.addr,
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )) == 200
    })
    .await;
    assert!(ok);
}

#[tokio::test]
async fn every_connection_header_line_names_hop_by_hop_headers() {
    let (upstream, gateway) = gateway_with_limits("      max_body: 1MiB\n").await;
    let raw = RawClient::exchange(
        gateway.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: X-One\r\nConnection: X-Two, close\r\nX-One: 1\r\nX-Two: 2\r\nX-Three: 3\r\n\r\n",
    );
    assert_eq!(status_of(&raw), 200, "{raw}");
    let seen = upstream.last().headers;
    assert!(
        !seen.contains_key("x-one") && !seen.contains_key("x-two"),
        "{seen:?}"
    );
    assert_eq!(seen["x-three"], "3");
}

#[tokio::test]
async fn idle_http2_connections_close_even_when_the_client_answers_pings() {
    let (_upstream, gateway) = gateway_with_limits("      idle_timeout: 500ms\n").await;
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get(gateway.url("/"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    let closed = eventually(Duration::from_secs(3), || sender.is_closed()).await;
    assert!(
        closed,
        "the gateway closed the idle HTTP/2 connection despite the pings"
    );
}

#[tokio::test]
async fn smuggling_shapes_found_by_fuzzing_are_refused_too() {
    let (upstream, gateway) = gateway_with_limits("      max_body: 1MiB\n").await;
    // empty lines before the request line (the parser skips them; the scanner must as well)
    let leading = RawClient::exchange(
        gateway.addr,
        b"\r\n\r\nPOST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(status_of(&leading), 400, "{leading}");
    // a pipelined second request with both headers, in the same segment as the first
    let mut client = gateway.raw();
    client.send(
        b"GET /first HTTP/1.1\r\nHost: t\r\n\r\nPOST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(status_of(&client.read_response()), 200);
    let second = client.read_response();
    assert_eq!(status_of(&second), 400, "{second}");
    assert_eq!(
        upstream.hits(),
        1,
        "only the first, clean request reached the upstream"
    );
}

#[tokio::test]
async fn long_invalid_paths_with_utf8_are_refused_without_crashing() {
    let (_upstream, gateway) = gateway_with_limits("      max_body: 1MiB\n").await;
    let path = format!("/{}é%2F", "a".repeat(254));
    let raw = RawClient::exchange(
        gateway.addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(status_of(&raw), 400, "{raw}");
    assert_eq!(gateway.get("/still-alive").await.status, 200);
}

#[tokio::test]
async fn non_ascii_paths_reach_the_upstream_intact() {
    let (upstream, gateway) = gateway_with_limits("      max_body: 1MiB\n").await;
    let raw = RawClient::exchange(
        gateway.addr,
        "GET //café/%7euser HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".as_bytes(),
    );
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(upstream.last().path_and_query, "/café/~user");
}
