//! Request composition: parallel and dependent calls, merging, partial failures, timeouts,
//! encoding of values put into paths, limits, and config errors.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

/// Upstreams `users` and `orders` (and `app`, the route's), a route `/dash/{id}` for API key
/// `key-alice` with the given `compose` section (indented for a route).
fn config(users: &TestUpstream, orders: &TestUpstream, compose: &str) -> String {
    format!(
        "server:\n  watch_config: false\nadmin:\n  enabled: false\n\
         listeners:\n  - name: main\n    bind: 127.0.0.1:0\n\
         upstreams:\n  - name: app\n    targets: [{{ url: \"{}\" }}]\n\
         \x20 - name: users\n    targets: [{{ url: \"{}\" }}]\n\
         \x20 - name: orders\n    targets: [{{ url: \"{}\" }}]\n\
         authentication:\n  api_keys:\n    - name: keys\n      keys:\n\
         \x20       - {{ id: alice, sha256: {}, roles: [reader] }}\n\
         authorization:\n  roles:\n    - name: reader\n      permissions: [\"GET /**\"]\n\
         routes:\n  - name: dash\n    match: {{ path: \"/dash/{{id}}\" }}\n    auth: [keys]\n    upstream: app\n    compose:\n{compose}",
        users.url(),
        users.url(),
        orders.url(),
        digest("key-alice"),
    )
}

async fn get(gateway: &TestGateway, path: &str) -> TestResponse {
    send(
        Request::get(gateway.url(path))
            .header("x-api-key", "key-alice")
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn calls_run_in_parallel_and_are_merged_into_named_sections() {
    let users = TestUpstream::start(|r| {
        Reply::ok(&format!(
            "{{\"path\": \"{}\", \"subject\": \"{}\"}}",
            r.path_and_query,
            r.headers["x-auth-subject"].to_str().unwrap()
        ))
        .delayed(Duration::from_millis(400))
    })
    .await;
    let orders = TestUpstream::start(|r| {
        Reply::ok(&format!("[{{\"order\": \"{}\"}}]", r.path_and_query))
            .delayed(Duration::from_millis(400))
    })
    .await;
    let gateway = TestGateway::start(&config(
        &users,
        &orders,
        "      calls:\n\
         \x20       - { name: user, upstream: users, path: \"/users/{id}\" }\n\
         \x20       - { name: orders, upstream: orders, path: \"/orders?owner={subject}&for={id}\" }\n",
    ))
    .await;
    let started = Instant::now();
    let response = get(&gateway, "/dash/42").await;
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.headers["content-type"], "application/json");
    assert_eq!(
        response.json(),
        serde_json::json!({
            "user": {"path": "/users/42", "subject": "alice"},
            "orders": [{"order": "/orders?owner=alice&for=42"}]
        })
    );
    assert!(
        elapsed < Duration::from_millis(750),
        "two 400 ms calls in parallel took {elapsed:?}"
    );
    // the calls carry the gateway's identity headers and accept JSON
    assert_eq!(orders.last().headers["accept"], "application/json");
    assert!(orders.last().headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn a_call_that_uses_another_calls_json_runs_after_it_with_the_value_encoded() {
    let users = TestUpstream::start(|_| {
        Reply::ok("{\"team\": {\"name\": \"../admin?all=1\"}, \"level\": 3}")
    })
    .await;
    let orders =
        TestUpstream::start(|r| Reply::ok(&format!("{{\"seen\": \"{}\"}}", r.path_and_query)))
            .await;
    let gateway = TestGateway::start(&config(
        &users,
        &orders,
        "      merge: object\n      calls:\n\
         \x20       - { name: team, upstream: orders, path: \"/teams/{user.team.name}/level/{user.level}\" }\n\
         \x20       - { name: user, upstream: users, path: \"/users/{id}\" }\n",
    ))
    .await;
    let response = get(&gateway, "/dash/7").await;
    assert_eq!(response.status, 200, "{}", response.body);
    // merged into one object; the JSON value cannot climb out of its path segment
    assert_eq!(
        response.json(),
        serde_json::json!({
            "team": {"name": "../admin?all=1"},
            "level": 3,
            "seen": "/teams/..%2Fadmin%3Fall%3D1/level/3"
        })
    );
    assert_eq!(
        orders.last().path_and_query,
        "/teams/..%2Fadmin%3Fall%3D1/level/3"
    );
}

#[tokio::test]
async fn a_failed_call_fails_the_request_or_is_marked_in_a_partial_answer() {
    let users = TestUpstream::start(|_| Reply::ok("{\"name\": \"alice\"}")).await;
    let orders = TestUpstream::start(|_| Reply::status(503)).await;
    let calls = "      calls:\n\
         \x20       - { name: user, upstream: users, path: \"/users/{id}\" }\n\
         \x20       - { name: orders, upstream: orders, path: \"/orders\" }\n\
         \x20       - { name: detail, upstream: users, path: \"/detail/{orders.0.id}\" }\n";
    let strict = TestGateway::start(&config(&users, &orders, calls)).await;
    let failed = get(&strict, "/dash/1").await;
    assert_eq!(failed.status, 502);
    assert_eq!(failed.json()["error"], "composition_failed");
    assert!(
        !failed.body.contains("503"),
        "no upstream detail: {}",
        failed.body
    );

    let partial = TestGateway::start(&config(
        &users,
        &orders,
        &format!("      on_failure: partial\n{calls}"),
    ))
    .await;
    let response = get(&partial, "/dash/1").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["x-compose-partial"], "orders, detail");
    assert_eq!(
        response.json(),
        serde_json::json!({
            "user": {"name": "alice"},
            "orders": null,
            "detail": null,
            "_errors": {"orders": "status 503", "detail": "a call it depends on failed"}
        })
    );
    assert!(
        users
            .received()
            .iter()
            .all(|r| !r.path_and_query.starts_with("/detail")),
        "the dependent call was never made"
    );
}

#[tokio::test]
async fn each_call_has_its_own_timeout() {
    let users = TestUpstream::start(|_| Reply::ok("{\"fast\": true}")).await;
    let orders = TestUpstream::start(|_| Reply::ok("{}").delayed(Duration::from_secs(3))).await;
    let gateway = TestGateway::start(&config(
        &users,
        &orders,
        "      on_failure: partial\n      calls:\n\
         \x20       - { name: fast, upstream: users, path: \"/f\" }\n\
         \x20       - { name: slow, upstream: orders, path: \"/s\", timeout: 200ms }\n",
    ))
    .await;
    let started = Instant::now();
    let response = get(&gateway, "/dash/1").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.json()["_errors"]["slow"], "timeout");
    assert_eq!(response.json()["fast"]["fast"], true);
}

#[tokio::test]
async fn responses_that_are_not_json_or_too_large_fail() {
    let users = TestUpstream::start(|_| Reply::ok("<html>not json</html>")).await;
    let orders = TestUpstream::start(|_| Reply::ok(&format!("\"{}\"", "x".repeat(4096)))).await;
    let gateway = TestGateway::start(&config(
        &users,
        &orders,
        "      on_failure: partial\n      max_response_size: 1KiB\n      calls:\n\
         \x20       - { name: html, upstream: users, path: \"/h\" }\n",
    ))
    .await;
    let response = get(&gateway, "/dash/1").await;
    assert_eq!(response.json()["_errors"]["html"], "invalid JSON");
    let too_large = TestGateway::start(&config(
        &users,
        &orders,
        "      on_failure: partial\n      max_response_size: 1KiB\n      calls:\n\
         \x20       - { name: big, upstream: orders, path: \"/b\" }\n",
    ))
    .await;
    // the size budget is a hard limit, even with `partial`
    assert_eq!(get(&too_large, "/dash/1").await.status, 502);
    // and policies still run first
    let anonymous = send(
        Request::get(too_large.url("/dash/1"))
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(orders.hits(), 1);
}

#[tokio::test]
async fn composition_config_errors_name_the_field() {
    let users = TestUpstream::echo().await;
    let orders = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    for (compose, expected) in [
        (
            "      calls:\n        - { name: a, path: \"/a/{b.x}\" }\n        - { name: b, path: \"/b/{a.x}\" }\n",
            "routes[0].compose.calls: the calls use each other's JSON in a cycle",
        ),
        (
            "      calls:\n        - { name: a, path: \"/a/{nope}\" }\n",
            "routes[0].compose.calls[0].path",
        ),
        (
            "      calls:\n        - { name: a, upstream: missing, path: \"/a\" }\n",
            "no upstream named `missing`",
        ),
        (
            "      calls:\n        - { name: a, path: \"/a\" }\n        - { name: a, path: \"/b\" }\n",
            "`a` is used twice",
        ),
        ("      calls: []\n", "between 1 and 16 calls"),
    ] {
        let yaml = config(&users, &orders, compose);
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let error = portcullis::config::load_file(&path)
            .and_then(|loaded| {
                portcullis::proxy::compile(&loaded, &portcullis::upstream::UpstreamRegistry::new(1), 1)
                    .map(|_| ())
            })
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{expected} in {error}");
        assert!(error.contains("portcullis.yaml:"), "{error}");
    }
}

#[tokio::test]
async fn composed_responses_are_compressed_when_the_route_says_so() {
    use http_body_util::BodyExt;
    use std::io::Read;

    let users =
        TestUpstream::start(|_| Reply::ok(&format!("{{\"bio\": \"{}\"}}", "words ".repeat(400))))
            .await;
    let orders = TestUpstream::start(|_| Reply::ok("[]")).await;
    let gateway = TestGateway::start(&config(
        &users,
        &orders,
        "      calls:\n\
         \x20       - { name: user, upstream: users, path: \"/users/{id}\" }\n\
         \x20       - { name: orders, upstream: orders, path: \"/orders\" }\n\
         \x20   compression: {}\n",
    ))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let response = client
        .request(
            Request::get(gateway.url("/dash/1"))
                .header("x-api-key", "key-alice")
                .header("accept-encoding", "gzip")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let mut json = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut json)
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["orders"], serde_json::json!([]));
    assert!(value["user"]["bio"].as_str().unwrap().starts_with("words"));
}
