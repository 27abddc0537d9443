//! Upstream behaviour: failures mapped to 502/503/504, retries, load balancing, active health
//! checks and passive outlier ejection.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

/// An address where nothing listens.
fn dead_target() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test]
async fn an_unreachable_upstream_gives_502_without_internal_detail() {
    let dead = dead_target();
    let gateway = TestGateway::start(&config_with(
        std::slice::from_ref(&dead),
        "    retries: { max_retries: 0 }\n",
        CATCH_ALL,
    ))
    .await;
    let response = gateway.get("/").await;
    assert_eq!(response.status, 502);
    let body = response.json();
    assert_eq!(body["error"], "upstream_connect_failure");
    assert!(
        !response.body.contains("127.0.0.1"),
        "no addresses leak: {}",
        response.body
    );
    assert!(
        !response.body.contains("refused"),
        "no causes leak: {}",
        response.body
    );
}

#[tokio::test]
async fn a_slow_upstream_gives_504() {
    let upstream = TestUpstream::start(|_| Reply::ok("late").delayed(Duration::from_secs(3))).await;
    let gateway = TestGateway::start(&config_with(
        &[upstream.url()],
        "    timeouts: { per_try: 300ms, total: 1s }\n",
        CATCH_ALL,
    ))
    .await;
    let started = std::time::Instant::now();
    let response = gateway.get("/").await;
    assert_eq!(response.status, 504);
    assert_eq!(response.json()["error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_another_target_but_posts_are_not() {
    let failing = TestUpstream::start(|_| Reply::status(503)).await;
    let healthy = TestUpstream::start(|_| Reply::ok("fine")).await;
    let gateway = TestGateway::start(&config_with(
        &[failing.url(), healthy.url()],
        "    retries: { max_retries: 1 }\n",
        CATCH_ALL,
    ))
    .await;
    for _ in 0..6 {
        let response = gateway.get("/").await;
        assert_eq!(response.status, 200, "GET is retried to the healthy target");
    }
    assert!(
        failing.hits() >= 2,
        "round robin sent some first tries to the failing target"
    );

    let mut posts = Vec::new();
    for _ in 0..6 {
        let response = send(
            Request::post(gateway.url("/"))
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;
        posts.push(response.status);
    }
    assert!(
        posts.contains(&503),
        "a POST that hit the failing target is not retried: {posts:?}"
    );
}

#[tokio::test]
async fn connect_failures_are_retried() {
    let healthy = TestUpstream::start(|_| Reply::ok("fine")).await;
    let gateway =
        TestGateway::start(&config_with(&[dead_target(), healthy.url()], "", CATCH_ALL)).await;
    for _ in 0..6 {
        assert_eq!(gateway.get("/").await.status, 200);
    }
}

#[tokio::test]
async fn weights_shape_round_robin() {
    let heavy = TestUpstream::echo().await;
    let light = TestUpstream::echo().await;
    let yaml = config_with(&[heavy.url(), light.url()], "", CATCH_ALL).replace(
        &format!("url: {}\n", heavy.url()),
        &format!("url: {}\n        weight: 3\n", heavy.url()),
    );
    let gateway = TestGateway::start(&yaml).await;
    for _ in 0..40 {
        assert_eq!(gateway.get("/").await.status, 200);
    }
    assert_eq!((heavy.hits(), light.hits()), (30, 10));
}

#[tokio::test]
async fn consistent_hashing_keeps_a_key_on_one_target() {
    let a = TestUpstream::echo().await;
    let b = TestUpstream::echo().await;
    let c = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[a.url(), b.url(), c.url()],
        "    load_balancing: { policy: consistent_hash, hash_on: { header: x-user } }\n",
        CATCH_ALL,
    ))
    .await;
    let hits = |ups: [&TestUpstream; 3]| ups.map(|u| u.hits());
    for user in ["alice", "bob", "carol", "dave"] {
        let before = hits([&a, &b, &c]);
        for _ in 0..5 {
            let response = send(
                Request::get(gateway.url("/"))
                    .header("x-user", user)
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
            assert_eq!(response.status, 200);
        }
        let after = hits([&a, &b, &c]);
        let moved: Vec<usize> = (0..3).map(|i| after[i] - before[i]).collect();
        assert!(
            moved.contains(&5),
            "all of {user}'s requests went to one target: {moved:?}"
        );
    }
}

#[tokio::test]
async fn least_request_avoids_a_busy_target() {
    let slow =
        TestUpstream::start(|_| Reply::ok("slow").delayed(Duration::from_millis(1500))).await;
    let fast = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[slow.url(), fast.url()],
        "    load_balancing: { policy: least_request }\n",
        CATCH_ALL,
    ))
    .await;
    // occupy the slow target with requests in flight
    let url = gateway.url("/");
    let mut background = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        background.push(tokio::spawn(async move {
            send(Request::get(url).body(Full::default()).unwrap()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slow_before = slow.hits();
    for _ in 0..10 {
        assert_eq!(gateway.get("/").await.status, 200);
    }
    assert_eq!(
        slow.hits(),
        slow_before,
        "new requests avoid the target with requests in flight"
    );
    for task in background {
        assert_eq!(task.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn failing_health_checks_take_a_target_out_and_passing_ones_bring_it_back() {
    let flaky = TestUpstream::start(|r| {
        if r.path_and_query == "/healthz" {
            Reply::status(500)
        } else {
            Reply::ok("flaky")
        }
    })
    .await;
    let steady = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[flaky.url(), steady.url()],
        "    health_check: { path: /healthz, interval: 100ms, timeout: 200ms, unhealthy_threshold: 2, healthy_threshold: 2 }\n",
        CATCH_ALL,
    ))
    .await;
    let health_checks_seen = |u: &TestUpstream| {
        u.received()
            .iter()
            .filter(|r| r.path_and_query == "/healthz")
            .count()
    };
    // after two failed checks the target is out
    let out = eventually(Duration::from_secs(5), || health_checks_seen(&flaky) >= 3).await;
    assert!(out);
    let traffic = |u: &TestUpstream| {
        u.received()
            .iter()
            .filter(|r| r.path_and_query != "/healthz")
            .count()
    };
    let before = traffic(&flaky);
    for _ in 0..10 {
        assert_eq!(gateway.get("/work").await.status, 200);
    }
    assert_eq!(
        traffic(&flaky),
        before,
        "no traffic to the unhealthy target"
    );

    // it recovers after passing checks
    flaky.respond_with(|_| Reply::ok("recovered"));
    let seen_at = health_checks_seen(&flaky);
    assert!(
        eventually(Duration::from_secs(5), || health_checks_seen(&flaky)
            >= seen_at + 3)
        .await
    );
    for _ in 0..10 {
        assert_eq!(gateway.get("/work").await.status, 200);
    }
    assert!(
        traffic(&flaky) > before,
        "traffic returns to the recovered target"
    );
}

#[tokio::test]
async fn all_targets_unhealthy_gives_503() {
    let sick = TestUpstream::start(|r| {
        if r.path_and_query == "/healthz" {
            Reply::status(503)
        } else {
            Reply::ok("x")
        }
    })
    .await;
    let gateway = TestGateway::start(&config_with(
        &[sick.url()],
        "    health_check: { path: /healthz, interval: 100ms, timeout: 200ms, unhealthy_threshold: 1 }\n",
        CATCH_ALL,
    ))
    .await;
    assert!(eventually(Duration::from_secs(5), || sick.hits() >= 2).await);
    let response = gateway.get("/").await;
    assert_eq!(response.status, 503);
    assert_eq!(response.json()["error"], "no_healthy_upstream");
}

#[tokio::test]
async fn consecutive_failures_eject_a_target_for_a_while() {
    let bad = TestUpstream::start(|_| Reply::status(500)).await;
    let good = TestUpstream::echo().await;
    let gateway = TestGateway::start(&config_with(
        &[bad.url(), good.url()],
        "    retries: { max_retries: 0 }\n    outlier_detection: { consecutive_failures: 2, ejection_time: 1s, max_ejection_percent: 50 }\n",
        CATCH_ALL,
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(gateway.get("/").await.status);
    }
    assert_eq!(bad.hits(), 2, "two failures eject the target: {statuses:?}");
    for _ in 0..6 {
        assert_eq!(gateway.get("/").await.status, 200);
    }
    assert_eq!(bad.hits(), 2, "ejected: no traffic");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..4 {
        gateway.get("/").await;
    }
    assert!(bad.hits() > 2, "traffic returns after the ejection time");
}

#[tokio::test]
async fn h2c_targets_are_spoken_to_over_http2() {
    let upstream = TestUpstream::echo().await;
    let target = format!("h2c://{}", upstream.addr);
    let gateway =
        TestGateway::start(&config_with(std::slice::from_ref(&target), "", CATCH_ALL)).await;
    for _ in 0..3 {
        let response = gateway.get("/multiplexed").await;
        assert_eq!(response.status, 200, "{}", response.body);
    }
    let seen = upstream.last();
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.path_and_query, "/multiplexed");
}

#[tokio::test]
async fn a_pooled_connection_is_not_reused_while_its_request_body_is_still_streaming() {
    // an upstream that answers at once, without reading the body
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") => {
                            let _ =
                                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    let gateway = TestGateway::start(&config_with(
        &[format!("http://{addr}")],
        "    timeouts: { per_try: 3s }\n    outlier_detection: { consecutive_failures: 1, ejection_time: 60s, max_ejection_percent: 100 }\n",
        CATCH_ALL,
    ))
    .await;
    // a client starts an upload and stalls
    let mut stalled = gateway.raw();
    stalled.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n0123456789");
    assert_eq!(status_of(&stalled.read_response()), 200);
    // the next request must not be handed the connection still carrying that upload
    let started = std::time::Instant::now();
    let response = gateway.get("/next").await;
    assert_eq!(response.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gateway.get("/after").await.status,
        200,
        "the broken-off upload did not eject the target"
    );
}
