//! Observability: access-log fields and redaction, metrics after known traffic, trace context,
//! alerts to a webhook, anomaly detection, admin API security, and the dashboard in a real
//! headless Chromium.

use std::{net::SocketAddr, time::Duration};

use http::Request;
use http_body_util::Full;

use crate::support::*;

const ADMIN_TOKEN: &str = "observability-admin-token";
const API_KEY: &str = "key-alice-very-secret";
/// The W3C Trace Context specification's example `traceparent`.
const SPEC_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A gateway with a public route `open`, an API-key route `secure`, an admin token, trusted
/// loopback proxy (so tests choose client addresses) and `observability` as given.
async fn gateway(upstream: &TestUpstream, observability: &str, extra: &str) -> TestGateway {
    let routes = "  - name: open\n    match: { path: /open/** }\n    public: true\n    upstream: app\n\
                  \x20 - name: secure\n    match: { path: /secure/** }\n    auth: [keys]\n    authorization: { any_authenticated: true }\n    upstream: app\n";
    let yaml = format!(
        "{}authentication:\n  api_keys:\n    - name: keys\n      query: partner_key\n      keys:\n        - {{ id: alice, sha256: {} }}\nobservability:\n{observability}{extra}",
        config_with(&[upstream.url()], "", routes),
        digest(API_KEY),
    )
    .replacen(
        "admin:\n  enabled: false\n",
        &format!("admin:\n  enabled: false\n  token: \"{ADMIN_TOKEN}\"\n"),
        1,
    )
    .replacen("server:\n", "server:\n  trusted_proxies: [127.0.0.1/32]\n", 1);
    TestGateway::start(&yaml).await
}

async fn admin(gateway: &mut TestGateway) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(portcullis::admin::serve(
        listener,
        gateway.gateway().state(),
    ));
    addr
}

async fn admin_get(admin: SocketAddr, path: &str) -> TestResponse {
    send(
        Request::get(format!("http://{admin}{path}"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
}

/// A request from `client` (believed: the loopback peer is a trusted proxy).
async fn from(gateway: &TestGateway, client: &str, path: &str, key: Option<&str>) -> TestResponse {
    let mut request = Request::get(gateway.url(path)).header("x-forwarded-for", client);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    send(request.body(Full::default()).unwrap()).await
}

fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect()
}

async fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    assert!(
        eventually(Duration::from_secs(5), || log_lines(path).len() >= n).await,
        "expected {n} log lines, got {:?}",
        log_lines(path)
    );
    log_lines(path)
}

#[tokio::test]
async fn access_log_lines_carry_every_field_and_never_a_secret() {
    let upstream = TestUpstream::start(|_| {
        Reply::ok("fine")
            .header("set-cookie", "session=upstream-cookie-secret")
            .header("content-type", "text/plain")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let observability = format!(
        "  access_log:\n    output: {}\n    request_headers: [x-tenant, authorization, x-api-key, cookie]\n    response_headers: [set-cookie, content-type]\n    redact_query: [session_id]\n",
        log.display()
    );
    let mut gateway = gateway(&upstream, &observability, "").await;
    let ok = send(
        Request::get(
            gateway
                .url("/secure/orders?page=2&access_token=query-token-secret&session_id=sid-secret"),
        )
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-api-key", API_KEY)
        .header("x-tenant", "acme")
        .header("cookie", "sid=client-cookie-secret")
        .header("authorization", "Bearer bearer-token-secret")
        .header("user-agent", "observability-test/1.0")
        .header("traceparent", SPEC_TRACEPARENT)
        .body(Full::default())
        .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let refused = from(
        &gateway,
        "198.51.100.8",
        "/secure/orders",
        Some("wrong-key-secret"),
    )
    .await;
    // the key in the query parameter the API-key set reads (not a built-in secret name)
    let by_query = from(
        &gateway,
        "198.51.100.8",
        &format!("/secure/orders?partner_key={API_KEY}&x=1"),
        None,
    )
    .await;
    assert_eq!(by_query.status, 200);
    assert_eq!(refused.status, 401);

    let lines = wait_for_lines(&log, 3).await;
    let line = lines
        .iter()
        .find(|l| l["status"] == 200 && l["query"].as_str().unwrap_or_default().starts_with("page"))
        .expect("the 200 is logged");
    let timestamp = line["timestamp"].as_str().unwrap();
    assert!(
        timestamp.ends_with('Z') && timestamp.contains('T'),
        "{timestamp}"
    );
    assert_eq!(
        line["request_id"],
        ok.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(line["client_ip"], "198.51.100.7");
    assert!(line["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/secure/orders");
    assert_eq!(
        line["query"],
        "page=2&access_token=[redacted]&session_id=[redacted]"
    );
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["bytes_out"], 4);
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(line["upstream_ms"].as_f64().is_some());
    assert_eq!(line["route"], "secure");
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["upstream_target"], upstream.url().as_str());
    assert_eq!(line["retries"], 0);
    assert_eq!(line["auth_subject"], "alice");
    assert_eq!(line["auth_method"], "api_key");
    assert_eq!(line["authz"], "allow");
    assert_eq!(line["user_agent"], "observability-test/1.0");
    assert_eq!(line["request_headers"]["x-tenant"], "acme");
    assert_eq!(line["request_headers"]["authorization"], "[redacted]");
    assert_eq!(line["request_headers"]["x-api-key"], "[redacted]");
    assert_eq!(line["request_headers"]["cookie"], "[redacted]");
    assert_eq!(line["response_headers"]["set-cookie"], "[redacted]");
    assert_eq!(line["response_headers"]["content-type"], "text/plain");
    let failed = lines.iter().find(|l| l["status"] == 401).unwrap();
    // the gateway removes the key from the upstream's URL; the log shows that it was there
    let keyed = lines
        .iter()
        .find(|l| {
            l["query"]
                .as_str()
                .unwrap_or_default()
                .contains("partner_key")
        })
        .unwrap();
    assert_eq!(keyed["query"], "partner_key=[redacted]&x=1");
    assert!(failed["auth_failure"].is_string(), "{failed}");
    assert_eq!(failed["client_ip"], "198.51.100.8");

    // sampling: successes dropped, errors and denials always kept
    gateway
        .reload(&reload_yaml(&upstream, &log, "    sample_success: 0.0\n"))
        .expect("reload");
    for _ in 0..5 {
        assert_eq!(
            from(&gateway, "198.51.100.9", "/open/x", None).await.status,
            200
        );
    }
    assert_eq!(
        from(&gateway, "198.51.100.9", "/nowhere", None)
            .await
            .status,
        404
    );
    let lines = wait_for_lines(&log, 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines_after = log_lines(&log);
    assert_eq!(lines_after.len(), lines.len());
    assert_eq!(lines.len(), 4, "only the 404 was added: {lines:?}");
    assert_eq!(lines[3]["status"], 404);
    assert!(lines[3].get("route").is_none());

    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [
        API_KEY,
        "wrong-key-secret",
        "query-token-secret",
        "sid-secret",
        "client-cookie-secret",
        "bearer-token-secret",
        "upstream-cookie-secret",
    ] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into the access log:\n{text}"
        );
    }
}

fn reload_yaml(upstream: &TestUpstream, log: &std::path::Path, extra_access_log: &str) -> String {
    let routes =
        "  - name: open\n    match: { path: /open/** }\n    public: true\n    upstream: app\n";
    format!(
        "{}observability:\n  access_log:\n    output: {}\n{extra_access_log}",
        config_with(&[upstream.url()], "", routes),
        log.display()
    )
    .replacen(
        "server:\n",
        "server:\n  trusted_proxies: [127.0.0.1/32]\n",
        1,
    )
}

/// The value of one sample line of the Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let upstream = TestUpstream::echo().await;
    let mut gateway = gateway(&upstream, "  access_log: { enabled: false }\n", "").await;
    let admin = admin(&mut gateway).await;
    for _ in 0..5 {
        assert_eq!(
            from(&gateway, "192.0.2.1", "/open/a", None).await.status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            from(&gateway, "192.0.2.1", "/missing", None).await.status,
            404
        );
    }
    for _ in 0..3 {
        assert_eq!(
            from(&gateway, "192.0.2.2", "/secure/a", Some("nope"))
                .await
                .status,
            401
        );
    }
    assert_eq!(
        from(&gateway, "192.0.2.3", "/secure/a", Some(API_KEY))
            .await
            .status,
        200
    );
    // metrics need no token by default
    let scrape = || async {
        send(
            Request::get(format!("http://{admin}/metrics"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .body
    };
    assert!(
        until(Duration::from_secs(3), || async {
            let text = scrape().await;
            metric(&text, "portcullis_in_flight_requests") == Some(0.0)
                && metric(&text, "portcullis_requests_total{route=\"secure\",method=\"GET\",status_class=\"2xx\"}") == Some(1.0)
        })
        .await,
        "{}",
        scrape().await
    );
    let text = scrape().await;
    assert_eq!(
        metric(
            &text,
            "portcullis_requests_total{route=\"open\",method=\"GET\",status_class=\"2xx\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_requests_total{route=\"(none)\",method=\"GET\",status_class=\"4xx\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "portcullis_request_duration_seconds_count{route=\"open\",method=\"GET\",status_class=\"2xx\"}"),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_errors_total{route=\"(none)\",kind=\"not_found\"}"
        ),
        Some(2.0),
        "{text}"
    );
    let auth_failures: f64 = text
        .lines()
        .filter(|l| l.starts_with("portcullis_auth_failures_total{route=\"secure\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(auth_failures, 3.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "portcullis_security_events_total{kind=\"auth_failure\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_security_events_total{kind=\"not_found\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "portcullis_upstream_target_healthy{{upstream=\"app\",target=\"{}\"}}",
                upstream.url()
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(metric(&text, "portcullis_open_connections").is_some());
    assert!(text.contains("# TYPE portcullis_request_duration_seconds histogram"));
    // bounded labels: no raw path or address ever becomes a label
    assert!(!text.contains("/open/a") && !text.contains("192.0.2.1"));
}

/// Polls an async check until it holds or `within` passes.
async fn until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn trace_context_reaches_the_upstream() {
    let upstream = TestUpstream::echo().await;
    let gateway = gateway(&upstream, "  access_log: { enabled: false }\n", "").await;
    let parse = |value: &str| -> (String, String) {
        let parts: Vec<&str> = value.split('-').collect();
        assert_eq!(parts.len(), 4, "{value}");
        assert_eq!((parts[0], parts[3].len()), ("00", 2));
        (parts[1].to_owned(), parts[2].to_owned())
    };
    // continued: same trace, the gateway's span as the parent
    let continued = send(
        Request::get(gateway.url("/open/t"))
            .header("traceparent", SPEC_TRACEPARENT)
            .header("tracestate", "vendor=abc")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(continued.status, 200);
    let received = upstream.last();
    let (trace, parent) = parse(received.headers["traceparent"].to_str().unwrap());
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7");
    assert_eq!(received.headers["tracestate"], "vendor=abc");
    // started: none given, or an invalid one
    for given in [
        None,
        Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        Some("garbage"),
    ] {
        let mut request = Request::get(gateway.url("/open/t"));
        if let Some(given) = given {
            request = request.header("traceparent", given);
        }
        assert_eq!(
            send(request.body(Full::default()).unwrap()).await.status,
            200
        );
        let (trace, _) = parse(upstream.last().headers["traceparent"].to_str().unwrap());
        assert_eq!(trace.len(), 32);
        assert_ne!(trace, "00000000000000000000000000000000");
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}

/// Notifications a webhook receiver got, as JSON.
fn notifications(receiver: &TestUpstream) -> Vec<serde_json::Value> {
    receiver
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| serde_json::from_slice(&r.body).expect("JSON notification"))
        .collect()
}

#[tokio::test]
async fn an_error_ratio_alert_fires_and_resolves_at_a_webhook() {
    let upstream = TestUpstream::start(|_| Reply::status(500)).await;
    let receiver = TestUpstream::start(|_| Reply::status(204)).await;
    let observability = format!(
        "  access_log: {{ enabled: false }}\n  sampling: {{ interval: 100ms, history: 1m }}\n  alerts:\n    webhooks:\n      - url: {}/hooks/alerts\n        token: webhook-secret\n    rules:\n      - name: open-errors\n        signal: error_ratio\n        route: open\n        above: 0.05\n        window: 500ms\n        min_requests: 5\n        severity: critical\n",
        receiver.url()
    );
    let mut gateway = gateway(&upstream, &observability, "").await;
    let admin = admin(&mut gateway).await;
    for _ in 0..10 {
        assert_eq!(
            from(&gateway, "192.0.2.9", "/open/x", None).await.status,
            500
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || notifications(&receiver)
            .iter()
            .any(|n| n["state"] == "firing"))
        .await,
        "no firing notification"
    );
    let fired = notifications(&receiver);
    let firing = &fired[0];
    assert_eq!(firing["alert"], "open-errors");
    assert_eq!(firing["severity"], "critical");
    assert_eq!(firing["route"], "open");
    assert_eq!(firing["value"], 1.0);
    assert!(
        firing["summary"].as_str().unwrap().contains("error ratio"),
        "{firing}"
    );
    let request = &receiver.received()[0];
    assert_eq!(request.path_and_query, "/hooks/alerts");
    assert_eq!(request.headers["authorization"], "Bearer webhook-secret");
    assert_eq!(request.headers["content-type"], "application/json");
    let alerts = admin_get(admin, "/alerts").await.json();
    assert_eq!(alerts[0]["name"], "open-errors", "{alerts}");
    let metrics = admin_get(admin, "/metrics").await.body;
    assert_eq!(
        metric(&metrics, "portcullis_alerts_firing{alert=\"open-errors\"}"),
        Some(1.0)
    );

    // healthy again: the window fills with successes and the alert resolves
    upstream.respond_with(|_| Reply::ok("ok"));
    assert!(
        until(Duration::from_secs(5), || async {
            from(&gateway, "192.0.2.9", "/open/x", None).await;
            notifications(&receiver)
                .iter()
                .any(|n| n["state"] == "resolved")
        })
        .await,
        "no resolved notification: {:?}",
        notifications(&receiver)
    );
    let resolved = notifications(&receiver)
        .into_iter()
        .find(|n| n["state"] == "resolved")
        .unwrap();
    assert_eq!(resolved["alert"], "open-errors");
    assert!(resolved["ended_at"].is_string());
    assert_eq!(
        notifications(&receiver)
            .iter()
            .filter(|n| n["state"] == "firing")
            .count(),
        1,
        "fired once"
    );
    assert_eq!(
        admin_get(admin, "/alerts").await.json(),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn a_webhook_that_fails_is_retried() {
    let upstream = TestUpstream::start(|_| Reply::status(503)).await;
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = attempts.clone();
    let receiver = TestUpstream::start(move |_| {
        // the first attempt fails
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let observability = format!(
        "  access_log: {{ enabled: false }}\n  sampling: {{ interval: 100ms, history: 1m }}\n  alerts:\n    webhooks:\n      - url: {}/hook\n        retries: 2\n    rules:\n      - name: any-errors\n        signal: error_ratio\n        above: 0.5\n        window: 300ms\n        min_requests: 3\n",
        receiver.url()
    );
    let gateway = gateway(&upstream, &observability, "").await;
    for _ in 0..5 {
        from(&gateway, "192.0.2.10", "/open/x", None).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || receiver.hits() >= 2).await,
        "the failed delivery was retried"
    );
}

#[tokio::test]
async fn a_brute_force_from_one_network_raises_an_anomaly_and_tightens_its_limits() {
    let upstream = TestUpstream::echo().await;
    let receiver = TestUpstream::start(|_| Reply::status(204)).await;
    let observability = format!(
        "  access_log: {{ enabled: false }}\n  sampling: {{ interval: 100ms, history: 1m }}\n  alerts:\n    webhooks:\n      - url: {}/hook\n  anomaly:\n    events: [auth_failure]\n    window: 1s\n    min_events: 20\n    adaptive_points: 25\n",
        receiver.url()
    );
    let rate_limits = "rate_limits:\n  rules:\n    - name: per-client\n      key: [client_ip]\n      rate: 6000/min\n      global: true\n  adaptive:\n    points: { auth_failure: 0.1 }\n    thresholds:\n      - { score: 20, multiplier: 0.5 }\n";
    let mut gateway = gateway(&upstream, &observability, rate_limits).await;
    let admin = admin(&mut gateway).await;
    // background: a few failures from another network
    for i in 0..3 {
        from(
            &gateway,
            &format!("198.51.100.{i}"),
            "/secure/x",
            Some("bad"),
        )
        .await;
    }
    // a 404 scan from a third network: not an event this detector counts (`events: [auth_failure]`)
    for i in 0..30 {
        from(
            &gateway,
            &format!("192.0.2.{i}"),
            &format!("/scan/{i}"),
            None,
        )
        .await;
    }
    // the attack: failed logins spread over one /24
    for i in 1..=30 {
        let status = from(
            &gateway,
            &format!("203.0.113.{i}"),
            "/secure/x",
            Some("guess"),
        )
        .await
        .status;
        assert_eq!(status, 401);
    }
    assert!(
        eventually(Duration::from_secs(5), || notifications(&receiver)
            .iter()
            .any(|n| n["state"] == "firing"))
        .await,
        "no anomaly notification"
    );
    let raised = notifications(&receiver);
    assert_eq!(raised.len(), 1, "only the attacking network: {raised:?}");
    assert_eq!(raised[0]["alert"], "anomaly:203.0.113.0/24");
    assert_eq!(raised[0]["network"], "203.0.113.0/24");
    assert!(raised[0]["value"].as_f64().unwrap() >= 20.0);
    // handed to the adaptive limiter: the network's limits are tightened
    let suspicious = admin_get(admin, "/ratelimits/suspicious").await.json();
    let network = suspicious
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == "net:203.0.113.0/24")
        .unwrap_or_else(|| panic!("{suspicious}"));
    assert!(network["score"].as_f64().unwrap() >= 25.0, "{network}");
    assert!(network["multiplier"].as_f64().unwrap() < 1.0, "{network}");
    let alerts = admin_get(admin, "/alerts").await.json();
    assert_eq!(alerts[0]["name"], "anomaly:203.0.113.0/24");
    // and it calms down once the window has passed
    assert!(
        eventually(Duration::from_secs(5), || notifications(&receiver)
            .iter()
            .any(|n| n["state"] == "resolved"))
        .await,
        "the anomaly resolves"
    );
}

#[tokio::test]
async fn the_admin_api_refuses_everything_but_probes_and_metrics_without_a_token() {
    let upstream = TestUpstream::echo().await;
    let admin_port = free_port();
    let port = free_port();
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:{admin_port}\nlisteners:\n  - name: main\n    bind: 127.0.0.1:{port}\nupstreams:\n  - name: app\n    targets:\n      - url: {}\nroutes:\n  - name: x\n    public: true\n    upstream: app\nobservability:\n  metrics: {{ require_token: true }}\n",
        upstream.url()
    );
    let process = GatewayProcess::start(&yaml, port);
    process.wait_for_port(admin_port);
    let get = |path: &str| {
        send(
            Request::get(format!("http://127.0.0.1:{admin_port}{path}"))
                .header("authorization", "Bearer guess")
                .body(Full::default())
                .unwrap(),
        )
    };
    assert_eq!(get("/healthz").await.status, 200);
    for path in [
        "/config",
        "/metrics",
        "/dashboard/data",
        "/ratelimits",
        "/alerts",
    ] {
        let refused = get(path).await;
        assert_eq!(refused.status, 401, "{path}");
        assert!(
            refused.body.contains("no admin token is configured"),
            "{}",
            refused.body
        );
    }
    // the page holds no data; it is served, locked down
    let page = get("/dashboard").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    assert!(
        !page.body.contains("http://") || !page.body.contains("<script src"),
        "no external assets"
    );
    assert!(
        process.log_text().contains("no admin token"),
        "{}",
        process.log_text()
    );
}

// === the dashboard in a real browser ===

/// ChromeDriver on a free port, stopped on drop.
struct ChromeDriver {
    child: std::process::Child,
    port: u16,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Option<ChromeDriver> {
    let found = std::path::Path::new("/usr/bin/chromedriver").exists()
        && std::path::Path::new("/usr/bin/chromium").exists();
    if !found {
        // CI installs both (scripts/deps.sh); a developer machine without them skips loudly
        assert!(
            std::env::var("CI").is_err(),
            "chromium and chromedriver are required in CI (scripts/deps.sh installs them)"
        );
        eprintln!("SKIPPED: install chromium and chromium-driver to run the dashboard test");
        return None;
    }
    let port = free_port();
    let child = std::process::Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(ChromeDriver { child, port })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_traffic_in_a_headless_browser() {
    let Some(driver) = chromedriver() else { return };
    let upstream = TestUpstream::echo().await;
    let observability =
        "  access_log: { enabled: false }\n  sampling: { interval: 200ms, history: 1m }\n";
    let mut gateway = gateway(&upstream, observability, "").await;
    let admin = admin(&mut gateway).await;

    let mut capabilities = serde_json::Map::new();
    let profile = tempfile::tempdir().unwrap();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let client =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a browser session");
    let result = drive_dashboard(&client, admin, &gateway).await;
    let _ = client.close().await;
    result.unwrap();
}

async fn drive_dashboard(
    client: &fantoccini::Client,
    admin: SocketAddr,
    gateway: &TestGateway,
) -> Result<(), String> {
    let read = |script: &'static str| async move {
        client
            .execute(script, vec![])
            .await
            .map_err(|e| format!("{script}: {e}"))
    };
    let wait_for = |script: &'static str, what: &'static str| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if read(script).await? == serde_json::Value::Bool(true) {
                return Ok::<(), String>(());
            }
            if std::time::Instant::now() > deadline {
                let status = read("return document.getElementById('status').textContent").await?;
                return Err(format!("timed out waiting for {what} (status: {status})"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    client
        .goto(&format!("http://{admin}/dashboard#token={ADMIN_TOKEN}"))
        .await
        .map_err(|e| e.to_string())?;
    wait_for(
        "return Number(document.getElementById('updated').dataset.updates || 0) >= 1",
        "the first update",
    )
    .await?;
    let status = read("return document.getElementById('status').textContent").await?;
    if status != "live" {
        return Err(format!("status {status}"));
    }
    // the token left the address bar
    let url = read("return location.href").await?;
    if url.as_str().unwrap_or_default().contains(ADMIN_TOKEN) {
        return Err(format!("the token stayed in the URL: {url}"));
    }
    let before = read("return document.getElementById('total-requests').textContent").await?;
    if before != serde_json::json!("0") {
        return Err(format!("traffic before any was sent: {before}"));
    }

    // live traffic while the page polls: one busy client, and failed logins from another
    let url = gateway.url("/open/page");
    let traffic = tokio::spawn(async move {
        loop {
            let request = Request::get(url.as_str())
                .header("x-forwarded-for", "203.0.113.50")
                .body(Full::default())
                .unwrap();
            send(request).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    for _ in 0..5 {
        from(gateway, "198.51.100.60", "/secure/x", Some("bad")).await;
    }
    let checks = async {
        wait_for(
            "return Number(document.getElementById('chart-traffic').dataset.last) > 0",
            "the traffic chart",
        )
        .await?;
        wait_for(
            "return Number(document.getElementById('total-requests').textContent) >= 45",
            "the request total",
        )
        .await?;
        wait_for(
            "return Number(document.getElementById('total-auth-failures').textContent) >= 5",
            "the auth failure total",
        )
        .await?;
        wait_for(
            "return Number(document.getElementById('chart-traffic').dataset.points) >= 2 && \
             Number(document.getElementById('chart-latency').dataset.points) >= 2",
            "chart points",
        )
        .await?;
        wait_for(
            "return document.querySelector('#top-clients tbody').textContent.includes('203.0.113.50')",
            "the top client",
        )
        .await?;
        wait_for(
            "return document.querySelector('#routes tbody').textContent.includes('open')",
            "the route table",
        )
        .await?;
        wait_for(
            "return document.querySelector('#upstreams tbody tr[data-state=\"healthy\"]') !== null",
            "upstream health",
        )
        .await
    }
    .await;
    traffic.abort();
    checks?;
    Ok(())
}

#[tokio::test]
async fn sampled_requests_are_exported_as_otlp_spans() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let upstream = TestUpstream::echo().await;
    let collector = TestUpstream::start(|_| Reply::status(200)).await;
    let observability = format!(
        "  access_log: {{ enabled: false }}\n  tracing:\n    otlp:\n      endpoint: {}/v1/traces\n      service_name: gateway-under-test\n",
        collector.url()
    );
    let gateway = gateway(&upstream, &observability, "").await;
    let ok = send(
        Request::get(gateway.url("/secure/orders"))
            .header("x-api-key", API_KEY)
            .header("traceparent", SPEC_TRACEPARENT)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let sent_upstream = upstream.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    // not sampled by the caller: not exported
    let unsampled = send(
        Request::get(gateway.url("/open/x"))
            .header(
                "traceparent",
                "00-11111111111111111111111111111111-2222222222222222-00",
            )
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(unsampled.status, 200);

    assert!(
        eventually(Duration::from_secs(5), || collector.hits() >= 1).await,
        "nothing was exported"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut spans = Vec::new();
    let mut service = None;
    for request in collector.received() {
        assert_eq!(request.path_and_query, "/v1/traces");
        assert_eq!(request.headers["content-type"], "application/x-protobuf");
        let export =
            ExportTraceServiceRequest::decode(request.body.clone()).expect("OTLP protobuf");
        for resource in export.resource_spans {
            for attribute in resource.resource.iter().flat_map(|r| r.attributes.iter()) {
                if attribute.key == "service.name" {
                    service = Some(format!("{:?}", attribute.value));
                }
            }
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    assert!(service.unwrap().contains("gateway-under-test"));
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(
        spans
            .iter()
            .all(|s| hex(&s.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736"),
        "only the sampled request's spans"
    );
    let server = spans
        .iter()
        .find(|s| s.name == "GET secure")
        .expect("the server span");
    assert_eq!(
        hex(&server.parent_span_id),
        "00f067aa0ba902b7",
        "child of the caller's span"
    );
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for phase in ["authenticate", "authorize", "upstream"] {
        let span = spans
            .iter()
            .find(|s| s.name == phase)
            .unwrap_or_else(|| panic!("{phase} in {names:?}"));
        assert_eq!(
            span.parent_span_id, server.span_id,
            "{phase} is a child of the server span"
        );
        assert!(span.start_time_unix_nano >= server.start_time_unix_nano);
        assert!(span.end_time_unix_nano <= server.end_time_unix_nano);
    }
    // the upstream was told its parent is the gateway's upstream span
    let upstream_span = spans.iter().find(|s| s.name == "upstream").unwrap();
    assert!(
        sent_upstream.contains(&hex(&upstream_span.span_id)),
        "{sent_upstream}"
    );
}

#[tokio::test]
async fn captured_payloads_are_logged_redacted() {
    let upstream = TestUpstream::start(|_| {
        Reply::ok(r#"{"id":7,"login":{"token":"response-token-secret"},"note":"ok"}"#)
            .header("content-type", "application/json")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let routes = "  - name: signup\n    match: { path: /signup }\n    public: true\n    upstream: app\n    capture_payload:\n      max_bytes: 256\n      redact_fields: [pin]\n\
                  \x20 - name: other\n    public: true\n    upstream: app\n";
    let yaml = format!(
        "{}observability:\n  access_log:\n    output: {}\n",
        config_with(&[upstream.url()], "", routes),
        log.display()
    );
    let gateway = TestGateway::start(&yaml).await;
    let post = |path: &str, content_type: &'static str, body: &'static str| {
        send(
            Request::post(gateway.url(path))
                .header("content-type", content_type)
                .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    };
    let signup = r#"{"user":"alice","password":"request-password-secret","card":{"PIN":"pin-value-secret"}}"#;
    assert_eq!(
        post("/signup", "application/json", signup).await.status,
        200
    );
    assert_eq!(
        upstream.last().body,
        signup.as_bytes(),
        "the upstream got the body unchanged"
    );
    assert_eq!(
        post(
            "/signup",
            "application/x-www-form-urlencoded",
            "user=bob&password=form-password-secret"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post("/signup", "text/plain", "password=text-password-secret")
            .await
            .status,
        200
    );
    assert_eq!(
        post("/other", "application/json", r#"{"x":"not-captured-here"}"#)
            .await
            .status,
        200
    );

    let lines = wait_for_lines(&log, 4).await;
    let json = &lines[0];
    assert_eq!(json["request_body"]["user"], "alice");
    assert_eq!(json["request_body"]["password"], "[redacted]");
    assert_eq!(json["request_body"]["card"]["PIN"], "[redacted]");
    assert_eq!(json["response_body"]["id"], 7);
    assert_eq!(json["response_body"]["login"]["token"], "[redacted]");
    assert_eq!(lines[1]["request_body"], "user=bob&password=[redacted]");
    assert_eq!(lines[2]["request_body"], "[29 bytes of text/plain]");
    assert!(
        lines[3].get("request_body").is_none(),
        "only routes that ask for it"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [
        "request-password-secret",
        "pin-value-secret",
        "response-token-secret",
        "form-password-secret",
        "text-password-secret",
        "not-captured-here",
    ] {
        assert!(!text.contains(secret), "{secret} in the log:\n{text}");
    }
}

#[tokio::test]
async fn a_request_the_client_abandons_is_still_logged_and_counted() {
    let upstream = TestUpstream::start(|_| Reply::ok("late").delayed(Duration::from_secs(2))).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let observability = format!("  access_log:\n    output: {}\n", log.display());
    let mut gateway = gateway(&upstream, &observability, "").await;
    let admin = admin(&mut gateway).await;
    // the client gives up long before the upstream answers
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        from(&gateway, "192.0.2.77", "/open/slow", None),
    )
    .await;
    assert!(gave_up.is_err());
    let lines = wait_for_lines(&log, 1).await;
    assert_eq!(lines[0]["status"], 499, "{}", lines[0]);
    assert_eq!(lines[0]["aborted"], true);
    assert_eq!(lines[0]["client_ip"], "192.0.2.77");
    assert_eq!(lines[0]["route"], "open");
    let metrics = admin_get(admin, "/metrics").await.body;
    assert_eq!(
        metric(
            &metrics,
            "portcullis_requests_total{route=\"open\",method=\"GET\",status_class=\"4xx\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "portcullis_in_flight_requests"), Some(0.0));
}

#[tokio::test]
async fn untrusted_clients_cannot_choose_the_trace() {
    let upstream = TestUpstream::echo().await;
    // no trusted proxies, default `trust_client_traces: false`
    let gateway = TestGateway::start(&config_with(&[upstream.url()], "", CATCH_ALL)).await;
    let response = send(
        Request::get(gateway.url("/x"))
            .header("traceparent", SPEC_TRACEPARENT)
            .header("tracestate", "vendor=forced-sampling")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    let received = upstream.last();
    let traceparent = received.headers["traceparent"].to_str().unwrap();
    assert!(
        !traceparent.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{traceparent}"
    );
    assert!(
        !received.headers.contains_key("tracestate"),
        "the client's tracestate is dropped"
    );
}

#[tokio::test]
async fn open_admin_endpoints_answer_only_requests_addressed_by_ip() {
    let upstream = TestUpstream::echo().await;
    let mut gateway = gateway(&upstream, "  access_log: { enabled: false }\n", "").await;
    let admin = admin(&mut gateway).await;
    for path in ["/metrics", "/dashboard"] {
        // a browser's request under a rebound name (it sends Sec-Fetch-* headers)
        let rebound = send(
            Request::get(format!("http://{admin}{path}"))
                .header("host", format!("attacker.example:{}", admin.port()))
                .header("sec-fetch-site", "same-origin")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(rebound.status, 421, "{path}");
        for host in [
            format!("127.0.0.1:{}", admin.port()),
            "localhost".to_owned(),
            "[::1]:9901".to_owned(),
        ] {
            let direct = send(
                Request::get(format!("http://{admin}{path}"))
                    .header("host", host.as_str())
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
            assert_eq!(direct.status, 200, "{path} {host}");
        }
    }
    // a scraper may address the listener by name (a Kubernetes Service, a compose service)
    let scrape = send(
        Request::get(format!("http://{admin}/metrics"))
            .header("host", "portcullis-admin.monitoring.svc:9901")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(scrape.status, 200);
    let page = send(
        Request::get(format!("http://{admin}/dashboard"))
            .header("host", "portcullis-admin.monitoring.svc:9901")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, 421, "the page only by address");
}
