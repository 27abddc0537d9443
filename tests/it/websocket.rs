//! WebSocket upgrades through the real gateway: the tunnel carries messages both ways and closes
//! cleanly, every policy runs on the upgrade request, routes without the opt-in never tunnel, idle
//! tunnels are closed, and an upstream that declines the upgrade is an ordinary response.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        handshake::server::{Request as WsRequest, Response as WsResponse},
        Error as WsError, Message,
    },
    MaybeTlsStream, WebSocketStream,
};

use crate::support::{
    config_with, digest, eventually, raw_headers, status_of, Reply, TestGateway, TestUpstream,
};

/// A WebSocket echo server: greets each client, then echoes every text and binary message.
struct EchoServer {
    addr: SocketAddr,
    /// Upgrades accepted (a refused upgrade request never gets here).
    tunnels: Arc<AtomicUsize>,
    /// The head of the last upgrade request.
    last_headers: Arc<Mutex<Option<HeaderMap>>>,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let last_headers = Arc::new(Mutex::new(None));
        let (count, seen) = (tunnels.clone(), last_headers.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (count, seen) = (count.clone(), seen.clone());
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // tungstenite's callback signature
                    let callback = |request: &WsRequest, mut response: WsResponse| {
                        *seen.lock().unwrap() = Some(request.headers().clone());
                        if request.headers().contains_key("sec-websocket-protocol") {
                            response
                                .headers_mut()
                                .insert("sec-websocket-protocol", "chat".parse().unwrap());
                        }
                        Ok(response)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                    else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    if ws.send(Message::text("hello from upstream")).await.is_err() {
                        return;
                    }
                    while let Some(Ok(message)) = ws.next().await {
                        // tungstenite answers pings and a close itself
                        let echo = matches!(message, Message::Text(_) | Message::Binary(_));
                        if echo && ws.send(message).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            tunnels,
            last_headers,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

const API_KEY: &str = "ws-key-alice";

/// A gateway to `target` with the given routes, an API-key set `keys`, an optional rate-limit
/// section and an optional access log file.
async fn gateway(
    target: &str,
    routes: &str,
    rate_limits: &str,
    access_log: Option<&std::path::Path>,
) -> TestGateway {
    let mut yaml = format!(
        "{}authentication:\n  api_keys:\n    - name: keys\n      keys:\n        - {{ id: alice, sha256: {} }}\n",
        config_with(&[target.to_owned()], "", routes),
        digest(API_KEY),
    );
    if !rate_limits.is_empty() {
        yaml.push_str("rate_limits:\n");
        yaml.push_str(rate_limits);
    }
    if let Some(path) = access_log {
        yaml.push_str(&format!(
            "observability:\n  access_log:\n    output: {}\n  metrics:\n    require_token: false\n",
            path.display()
        ));
    }
    TestGateway::start(&yaml).await
}

const WS_ROUTE: &str = "  - name: ws\n    match: { path: /ws/** }\n    public: true\n    websocket: true\n    upstream: app\n";

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the gateway, with extra request headers.
async fn connect(
    gateway: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Client,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    WsError,
> {
    let mut request = format!("ws://{}{path}", gateway.addr)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the handshake finishes")
}

/// The status of a refused handshake.
fn refused_status(result: Result<impl Sized, WsError>) -> u16 {
    match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}

async fn next_message(ws: &mut Client) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a message in time")
        .expect("the stream is open")
        .expect("a valid message")
}

fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect()
}

#[tokio::test]
async fn messages_cross_the_tunnel_both_ways_and_it_closes_cleanly() {
    let upstream = EchoServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gateway = gateway(&upstream.url(), WS_ROUTE, "", Some(&log)).await;

    let (mut ws, response) = connect(&gateway, "/ws/chat", &[("sec-websocket-protocol", "chat")])
        .await
        .expect("the upgrade succeeds");
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    assert!(response.headers().contains_key("x-request-id"));

    // upstream → client without a prompt
    assert_eq!(
        next_message(&mut ws).await,
        Message::text("hello from upstream")
    );
    ws.send(Message::text("ping över the gateway"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::text("ping över the gateway")
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(binary));

    // the upstream saw an upgrade offer and the usual forwarding headers
    let seen = upstream.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["connection"], "upgrade");
    assert!(seen.contains_key("sec-websocket-key"));
    assert_eq!(seen["sec-websocket-protocol"], "chat");
    assert!(seen.contains_key("x-request-id"));
    assert!(seen.contains_key("x-forwarded-for"));

    ws.close(None).await.unwrap();
    let closing = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = ws.next().await {
            if let Ok(Message::Close(_)) = message {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(closing, "the upstream's close frame came back");
    // the upstream has closed its connection; the client closes its own
    drop(ws);
    assert_eq!(upstream.tunnels.load(Ordering::SeqCst), 1);

    // one access-log line, written when the tunnel ended
    assert!(
        eventually(Duration::from_secs(5), || !log_lines(&log).is_empty()).await,
        "the tunnel is logged when it ends"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["status"], 101);
    assert_eq!(line["route"], "ws");
    assert_eq!(line["aborted"], false);
    // what the client was sent: the greeting, two echoes, the close (framing included)
    let bytes_out = line["bytes_out"].as_u64().unwrap();
    assert!(bytes_out > 70_000, "{line}");
    assert!(line["bytes_in"].as_u64().unwrap() > 70_000, "{line}");
}

#[tokio::test]
async fn an_upgrade_without_valid_credentials_is_refused_before_the_upstream() {
    let upstream = EchoServer::start().await;
    let routes = "  - name: ws\n    match: { path: /ws/** }\n    auth: [keys]\n    authorization: { any_authenticated: true }\n    websocket: true\n    upstream: app\n";
    let gateway = gateway(&upstream.url(), routes, "", None).await;

    assert_eq!(refused_status(connect(&gateway, "/ws/x", &[]).await), 401);
    assert_eq!(
        refused_status(connect(&gateway, "/ws/x", &[("x-api-key", "wrong")]).await),
        401
    );
    assert_eq!(upstream.tunnels.load(Ordering::SeqCst), 0);
    assert!(upstream.last_headers.lock().unwrap().is_none());

    let (mut ws, _) = connect(&gateway, "/ws/x", &[("x-api-key", API_KEY)])
        .await
        .expect("a valid key opens the tunnel");
    assert_eq!(
        next_message(&mut ws).await,
        Message::text("hello from upstream")
    );
    let seen = upstream.last_headers.lock().unwrap().clone().unwrap();
    assert!(
        !seen.contains_key("x-api-key"),
        "the credential is not forwarded"
    );
}

#[tokio::test]
async fn rate_limits_apply_to_upgrade_requests() {
    let upstream = EchoServer::start().await;
    let gateway = gateway(
        &upstream.url(),
        "  - name: ws\n    match: { path: /ws/** }\n    public: true\n    websocket: true\n    rate_limits: [upgrades]\n    upstream: app\n",
        "  rules:\n    - name: upgrades\n      key: [client_ip]\n      rate: 2/min\n",
        None,
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let (ws, _) = connect(&gateway, "/ws/x", &[])
            .await
            .expect("within limits");
        open.push(ws);
    }
    assert_eq!(refused_status(connect(&gateway, "/ws/x", &[]).await), 429);
    assert_eq!(upstream.tunnels.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_route_without_the_opt_in_forwards_a_plain_request() {
    let upstream = TestUpstream::start(|_| Reply::ok("plain answer")).await;
    let routes = "  - name: plain\n    public: true\n    upstream: app\n";
    let gateway = gateway(&upstream.url(), routes, "", None).await;
    let result = connect(&gateway, "/ws/x", &[]).await;
    assert_eq!(refused_status(result), 200);
    let seen = upstream.last();
    assert!(
        !seen.headers.contains_key("upgrade"),
        "the upgrade offer was stripped: {:?}",
        seen.headers
    );
    assert!(!seen.headers.contains_key("connection"));
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_its_timeout() {
    let upstream = EchoServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let routes = "  - name: ws\n    match: { path: /ws/** }\n    public: true\n    websocket: true\n    websocket_idle_timeout: 400ms\n    upstream: app\n";
    let mut gateway = gateway(&upstream.url(), routes, "", Some(&log)).await;
    let (mut ws, _) = connect(&gateway, "/ws/x", &[]).await.unwrap();
    let opened = Instant::now();
    assert_eq!(
        next_message(&mut ws).await,
        Message::text("hello from upstream")
    );
    // traffic keeps it open past the timeout
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text("still here"));
    }
    // then silence closes it
    let quiet_since = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        match ws.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel was closed");
    let waited = quiet_since.elapsed();
    assert!(waited >= Duration::from_millis(350), "{waited:?}");
    assert!(
        eventually(Duration::from_secs(5), || log_lines(&log).len() == 1).await,
        "{:?}",
        log_lines(&log)
    );
    assert_eq!(log_lines(&log)[0]["status"], 101);
    let lived = opened.elapsed();
    assert!(
        log_lines(&log)[0]["duration_ms"].as_f64().unwrap() >= 1000.0,
        "the log's duration spans the tunnel"
    );

    // latency metrics take the time to the 101, not the tunnel's life
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    tokio::spawn(portcullis::admin::serve(
        listener,
        gateway.gateway().state(),
    ));
    let metrics = crate::support::send(
        http::Request::get(format!("http://{admin}/metrics"))
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await
    .body;
    let (count, sum) = ["count", "sum"]
        .map(|field| {
            let prefix = format!("portcullis_request_duration_seconds_{field}{{route=\"ws\"");
            metrics
                .lines()
                .find(|l| l.starts_with(&prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{prefix} in\n{metrics}"))
        })
        .into();
    assert_eq!(count, 1.0);
    assert!(sum < 0.5, "{sum}s for a tunnel that lived {lived:?}");
}

#[tokio::test]
async fn an_upstream_that_declines_the_upgrade_is_an_ordinary_response() {
    let upstream = TestUpstream::start(|_| {
        Reply::ok("no websockets here").header("content-type", "text/plain")
    })
    .await;
    let gateway = gateway(&upstream.url(), WS_ROUTE, "", None).await;
    let mut raw = gateway.raw();
    raw.send(
        b"GET /ws/x HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    let response = raw.read_response();
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(response.ends_with("no websockets here"), "{response}");
    let headers = raw_headers(&response);
    assert!(!headers.contains_key("upgrade"), "{response}");
    // the upstream was offered the upgrade
    assert_eq!(upstream.last().headers["upgrade"], "websocket");
    // the connection goes on as a plain HTTP/1.1 connection
    raw.send(b"GET /ws/again HTTP/1.1\r\nHost: example.test\r\n\r\n");
    let again = raw.read_response();
    assert_eq!(status_of(&again), 200, "{again}");
}

#[test]
fn websocket_routes_need_http1_upstreams_and_idle_timeouts_need_the_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let check = |yaml: &str| {
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, yaml).unwrap();
        let loaded = portcullis::config::load_file(&path).expect("parses");
        portcullis::proxy::compile(&loaded, &portcullis::upstream::UpstreamRegistry::new(1), 1)
            .err()
            .map(|e| e.to_string())
    };
    let h2c = config_with(
        &["h2c://127.0.0.1:1".into()],
        "",
        "  - name: ws\n    public: true\n    websocket: true\n    upstream: app\n",
    );
    let error = check(&h2c).expect("h2c targets cannot upgrade");
    assert!(error.contains("routes[0].websocket"), "{error}");
    let stray = config_with(
        &["http://127.0.0.1:1".into()],
        "",
        "  - name: ws\n    public: true\n    websocket_idle_timeout: 1m\n    upstream: app\n",
    );
    let error = check(&stray).expect("a timeout without the opt-in is a mistake");
    assert!(
        error.contains("routes[0].websocket_idle_timeout"),
        "{error}"
    );
}
