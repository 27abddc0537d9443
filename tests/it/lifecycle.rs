//! The process lifecycle: hot reload (SIGHUP, file watch, broken configs), listeners added and
//! removed without a restart, in-flight requests across a reload, graceful shutdown, admin API.

use std::time::Duration;

use http::Request;
use http_body_util::Full;

use crate::support::*;

fn process_config(port: u16, upstream: &TestUpstream, routes: &str, watch: bool) -> String {
    format!(
        "server:\n  shutdown_timeout: 10s\n  watch_config: {watch}\n  log: {{ format: json }}\nadmin:\n  enabled: false\n\
         listeners:\n  - name: main\n    bind: 127.0.0.1:{port}\n\
         upstreams:\n  - name: app\n    targets:\n      - url: {}\nroutes:\n{routes}",
        upstream.url()
    )
}

const ROUTE_X: &str = "  - name: x\n    match: { path: /x }\n    public: true\n    upstream: app\n";
const ROUTE_ONLY: &str =
    "  - name: only\n    match: { path: /only }\n    public: true\n    upstream: app\n";

async fn status(port: u16, path: &str) -> u16 {
    send(
        Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
    .status
}

#[tokio::test]
async fn sighup_reloads_and_a_broken_config_keeps_the_old_one() {
    let upstream = TestUpstream::echo().await;
    let port = free_port();
    let process = GatewayProcess::start(&process_config(port, &upstream, ROUTE_X, false), port);
    assert_eq!(status(port, "/x").await, 200);

    // a broken config: rejected, logged, and the old routes keep serving
    std::fs::write(
        &process.config,
        process_config(
            port,
            &upstream,
            "  - name: x\n    upstream: nowhere\n",
            false,
        ),
    )
    .unwrap();
    process.signal("HUP");
    process.wait_for_log("config reload rejected");
    assert!(
        process.log_text().contains("unknown upstream `nowhere`"),
        "{}",
        process.log_text()
    );
    assert_eq!(status(port, "/x").await, 200);

    // a good config takes effect
    std::fs::write(
        &process.config,
        process_config(port, &upstream, ROUTE_ONLY, false),
    )
    .unwrap();
    process.signal("HUP");
    process.wait_for_log("config reloaded");
    assert_eq!(status(port, "/x").await, 404);
    assert_eq!(status(port, "/only").await, 200);
}

#[tokio::test]
async fn a_changed_config_file_is_reloaded_without_a_signal() {
    let upstream = TestUpstream::echo().await;
    let port = free_port();
    let process = GatewayProcess::start(&process_config(port, &upstream, ROUTE_X, true), port);
    assert_eq!(status(port, "/only").await, 404);
    std::fs::write(
        &process.config,
        process_config(port, &upstream, ROUTE_ONLY, true),
    )
    .unwrap();
    process.wait_for_log("config reloaded");
    assert_eq!(status(port, "/only").await, 200);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let upstream = TestUpstream::start(|_| {
        Reply::ok("slow but complete").delayed(Duration::from_millis(1200))
    })
    .await;
    let port = free_port();
    let mut process = GatewayProcess::start(&process_config(port, &upstream, ROUTE_X, false), port);
    let in_flight = tokio::spawn(async move {
        send(
            Request::get(format!("http://127.0.0.1:{port}/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await
    });
    assert!(eventually(Duration::from_secs(5), || upstream.hits() == 1).await);
    process.signal("TERM");
    let response = in_flight.await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "slow but complete");
    let exit = process.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "{exit:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer accepting"
    );
    assert!(
        process.log_text().contains("\"connections_cut\":0"),
        "{}",
        process.log_text()
    );
}

#[tokio::test]
async fn listeners_are_added_and_removed_by_reload() {
    let upstream = TestUpstream::echo().await;
    let yaml = config_with(&[upstream.url()], "", CATCH_ALL);
    let mut gateway = TestGateway::start(&yaml).await;
    let extra_port = free_port();
    let with_extra = yaml.replace(
        "    bind: 127.0.0.1:0\n",
        &format!("    bind: 127.0.0.1:0\n  - name: extra\n    bind: 127.0.0.1:{extra_port}\n"),
    );
    let summary = gateway.reload(&with_extra).unwrap();
    assert_eq!(summary.listeners_added, vec!["extra".to_owned()]);
    assert_eq!(status(extra_port, "/").await, 200);
    assert_eq!(
        gateway.get("/").await.status,
        200,
        "the untouched listener keeps serving"
    );

    let summary = gateway.reload(&yaml).unwrap();
    assert_eq!(summary.listeners_removed, vec!["extra".to_owned()]);
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect((
            "127.0.0.1",
            extra_port
        ))
        .is_err())
        .await,
        "the removed listener stops accepting"
    );
    assert_eq!(gateway.get("/").await.status, 200);
}

#[tokio::test]
async fn in_flight_requests_finish_on_the_config_they_started_with() {
    let upstream =
        TestUpstream::start(|_| Reply::ok("old route").delayed(Duration::from_millis(800))).await;
    let yaml = config_with(&[upstream.url()], "", ROUTE_X);
    let mut gateway = TestGateway::start(&yaml).await;
    let url = gateway.url("/x");
    let in_flight =
        tokio::spawn(async move { send(Request::get(url).body(Full::default()).unwrap()).await });
    assert!(eventually(Duration::from_secs(5), || upstream.hits() == 1).await);
    gateway
        .reload(&config_with(&[upstream.url()], "", ROUTE_ONLY))
        .unwrap();
    assert_eq!(
        gateway.get("/x").await.status,
        404,
        "new requests see the new config"
    );
    let response = in_flight.await.unwrap();
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "old route")
    );
}

#[tokio::test]
async fn a_reload_that_cannot_bind_changes_nothing() {
    let upstream = TestUpstream::echo().await;
    let yaml = config_with(&[upstream.url()], "", ROUTE_X);
    let mut gateway = TestGateway::start(&yaml).await;
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    let conflicting = config_with(&[upstream.url()], "", ROUTE_ONLY).replace(
        "    bind: 127.0.0.1:0\n",
        &format!("    bind: 127.0.0.1:0\n  - name: extra\n    bind: 127.0.0.1:{taken}\n"),
    );
    let error = gateway.reload(&conflicting).unwrap_err();
    assert!(
        error.to_string().contains("cannot bind listener `extra`"),
        "{error}"
    );
    assert_eq!(
        gateway.get("/x").await.status,
        200,
        "the old routes still serve"
    );
    assert_eq!(gateway.get("/only").await.status, 404);
}

#[tokio::test]
async fn admin_api_reports_health_readiness_and_a_redacted_config() {
    let upstream = TestUpstream::echo().await;
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:{admin}\nlisteners:\n  - name: main\n    bind: 127.0.0.1:{port}\n\
         upstreams:\n  - name: app\n    targets:\n      - url: {}\n\
         routes:\n  - name: x\n    match:\n      path: /x\n      headers: [{{ name: x-api-key, value: \"${{PORTCULLIS_TEST_SECRET}}\" }}]\n    public: true\n    upstream: app\n",
        upstream.url()
    );
    let process = GatewayProcess::start_with_env(
        &yaml,
        port,
        &[
            ("PORTCULLIS_TEST_SECRET", "hunter2-very-secret"),
            ("PORTCULLIS_ADMIN_TOKEN", "admin-token-from-env"),
        ],
    );
    process.wait_for_port(admin);
    let call = |path: &str, token: Option<&str>| {
        let mut request = Request::get(format!("http://127.0.0.1:{admin}{path}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        send(request.body(Full::default()).unwrap())
    };
    let get = |path: &str| call(path, Some("admin-token-from-env"));
    // probes and metrics need no token; everything else does, and a wrong one is refused
    assert_eq!(call("/healthz", None).await.status, 200);
    assert_eq!(call("/readyz", None).await.status, 200);
    assert_eq!(call("/metrics", None).await.status, 200);
    for path in [
        "/config",
        "/ratelimits",
        "/dashboard/data",
        "/alerts",
        "/revocations",
    ] {
        let refused = call(path, None).await;
        assert_eq!(refused.status, 401, "{path}");
        assert!(refused.headers.contains_key("www-authenticate"), "{path}");
        assert_eq!(call(path, Some("wrong")).await.status, 401, "{path}");
    }
    let config = get("/config").await;
    assert_eq!(config.status, 200);
    assert!(!config.body.contains("hunter2"), "{}", config.body);
    assert!(config.body.contains("[redacted]"), "{}", config.body);
    assert_eq!(config.json()["config"]["routes"][0]["name"], "x");
    assert_eq!(get("/nope").await.status, 404);
    // the secret works as a value
    let ok = send(
        Request::get(format!("http://127.0.0.1:{port}/x"))
            .header("x-api-key", "hunter2-very-secret")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
}
