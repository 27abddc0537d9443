//! Test support: real upstream servers, the real gateway (in process or as the binary), and
//! clients that speak both well-formed and deliberately malformed HTTP over real sockets.

#![allow(dead_code)]

pub mod redis;
pub mod tokens;

use std::{
    collections::HashMap,
    convert::Infallible,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use portcullis::{config, proxy::Gateway};
use tokio::net::TcpListener;

// === TestUpstream ===

/// What the test upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

/// How the test upstream answers one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub delay: Duration,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn ok(body: &str) -> Self {
        Self {
            status: 200,
            body: Bytes::copy_from_slice(body.as_bytes()),
            delay: Duration::ZERO,
            headers: Vec::new(),
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Self::ok("")
        }
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
}

type Responder = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A real HTTP server (HTTP/1.1 and h2c) on 127.0.0.1 that records every request.
pub struct TestUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    hits: Arc<AtomicUsize>,
    responder: Arc<Mutex<Responder>>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

async fn serve_upstream_connection(
    stream: tokio::net::TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    hits: Arc<AtomicUsize>,
    responder: Arc<Mutex<Responder>>,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let (received, hits, responder) = (received.clone(), hits.clone(), responder.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let record = Received {
                method: parts.method.to_string(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: parts.headers,
                body,
                version: parts.version,
            };
            hits.fetch_add(1, Ordering::SeqCst);
            let responder = responder.lock().unwrap().clone();
            let reply = responder(&record);
            received.lock().unwrap().push(record);
            if !reply.delay.is_zero() {
                tokio::time::sleep(reply.delay).await;
            }
            let mut response = Response::new(Full::new(reply.body));
            *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
            for (name, value) in reply.headers {
                response.headers_mut().append(name, value.parse().unwrap());
            }
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

impl TestUpstream {
    /// Answers 200 with a body naming the path it received.
    pub async fn echo() -> Self {
        Self::start(|r| Reply::ok(&format!("upstream saw {}", r.path_and_query))).await
    }

    pub async fn start(responder: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), responder).await
    }

    /// The server runs on its own thread and runtime, so a test may block (raw sockets) freely.
    pub async fn start_on(
        addr: SocketAddr,
        responder: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let responder: Arc<Mutex<Responder>> = Arc::new(Mutex::new(Arc::new(responder)));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        {
            let (received, hits, responder) = (received.clone(), hits.clone(), responder.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = match TcpListener::bind(addr).await {
                        Ok(listener) => listener,
                        Err(error) => {
                            let _ = addr_tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = addr_tx.send(Ok(listener.local_addr().unwrap()));
                    let accept = async move {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                continue;
                            };
                            let (received, hits, responder) =
                                (received.clone(), hits.clone(), responder.clone());
                            tokio::spawn(serve_upstream_connection(
                                stream, received, hits, responder,
                            ));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            });
        }
        let addr = addr_rx.recv().unwrap().expect("bind test upstream");
        Self {
            addr,
            received,
            hits,
            responder,
            stop: Mutex::new(Some(stop)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn last(&self) -> Received {
        self.received()
            .pop()
            .expect("the upstream received a request")
    }

    /// Changes how the upstream answers from now on.
    pub fn respond_with(&self, responder: impl Fn(&Received) -> Reply + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(responder);
    }

    /// Stops the server: the listener and every connection close.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

// === TestGateway (in process) ===

/// The real gateway server type, started in this process on loopback.
pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway from YAML; `{upstream:NAME}`-style placeholders are the caller's job
    /// (use `format!`). Listener `main` must exist; its address is `self.addr`.
    pub async fn start(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_yaml(yaml, dir.path());
        let gateway = Gateway::start(&loaded, Some(1)).expect("gateway starts");
        let addr = gateway.local_addr("main").expect("listener `main`");
        Self {
            gateway: Some(gateway),
            addr,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn gateway(&mut self) -> &mut Gateway {
        self.gateway.as_mut().unwrap()
    }

    /// Reloads with new YAML (relative paths against the same directory).
    pub fn reload(
        &mut self,
        yaml: &str,
    ) -> Result<portcullis::proxy::ReloadSummary, portcullis::proxy::ReloadError> {
        let loaded = load_yaml(yaml, self.dir.path());
        self.gateway().reload(&loaded)
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        send(Request::get(self.url(path)).body(Full::default()).unwrap()).await
    }

    pub fn raw(&self) -> RawClient {
        RawClient::connect(self.addr)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            // stop the workers without waiting for a drain
            drop(gateway);
        }
    }
}

/// Parses a config as `portcullis run` would, relative paths resolving against `dir`.
pub fn load_yaml(yaml: &str, dir: &Path) -> config::LoadedConfig {
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, yaml).unwrap();
    config::load_file(&path).unwrap_or_else(|errors| panic!("config should load:\n{errors}"))
}

/// A minimal config: listener `main` on a free port, one upstream `app` with the given targets,
/// and the given routes (YAML list items, indented by two spaces).
pub fn config_with(targets: &[String], upstream_extra: &str, routes: &str) -> String {
    let mut yaml = String::from(
        "server:\n  shutdown_timeout: 5s\n  watch_config: false\nadmin:\n  enabled: false\nlisteners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets:\n",
    );
    for target in targets {
        yaml.push_str(&format!("      - url: {target}\n"));
    }
    yaml.push_str(upstream_extra);
    yaml.push_str("routes:\n");
    yaml.push_str(routes);
    yaml
}

/// The lowercase hex SHA-256 of an API key, as the config's `sha256` wants it.
pub fn digest(key: &str) -> String {
    portcullis::policy::authn::sha256(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The usual single public catch-all route to `app`.
pub const CATCH_ALL: &str = "  - name: all\n    public: true\n    upstream: app\n";

// === clients ===

/// A response with its body read.
#[derive(Debug)]
pub struct TestResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    pub version: http::Version,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("JSON body, got {:?}", self.body))
    }
}

/// Sends a request with a fresh HTTP/1.1 client.
pub async fn send(request: Request<Full<Bytes>>) -> TestResponse {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("response within 20s")
        .expect("request succeeds at the HTTP level");
    read(response).await
}

/// Sends a request over HTTP/2 with prior knowledge (h2c).
pub async fn send_h2c(request: Request<Full<Bytes>>) -> TestResponse {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("response within 20s")
        .expect("h2c request succeeds");
    read(response).await
}

pub async fn read(response: Response<Incoming>) -> TestResponse {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    TestResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        version: parts.version,
    }
}

/// A plain TCP client for requests no well-behaved client would send.
pub struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) -> &mut Self {
        self.stream.write_all(bytes).expect("write");
        self
    }

    /// Reads until the peer closes (or the read timeout), returning what arrived.
    pub fn read_to_close(&mut self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads one response head and a `Content-Length` body.
    pub fn read_response(&mut self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1];
        while !out.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
                Ok(_) => out.push(buf[0]),
            }
        }
        let head = String::from_utf8_lossy(&out).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        let _ = self.stream.read_exact(&mut body);
        head + &String::from_utf8_lossy(&body)
    }

    /// Request and response in one go (with `Connection: close` expected in `request`).
    pub fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut client = Self::connect(addr);
        client.send(request);
        client.read_to_close()
    }
}

/// The status code of a raw HTTP/1.1 response.
pub fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// === the real binary ===

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portcullis"))
}

/// A free port on 127.0.0.1 (bound, then released; fine for tests that start the binary).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `portcullis run` as a child process.
pub struct GatewayProcess {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary with `yaml` and waits until `wait_port` accepts connections.
    pub fn start(yaml: &str, wait_port: u16) -> Self {
        Self::start_with_env(yaml, wait_port, &[])
    }

    pub fn start_with_env(yaml: &str, wait_port: u16, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("gateway.log");
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--workers", "1"])
            .envs(env.iter().copied())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr.log")).unwrap(),
            ))
            .spawn()
            .expect("start portcullis");
        let process = Self {
            child,
            config,
            log,
            _dir: dir,
        };
        process.wait_for_port(wait_port);
        process
    }

    pub fn wait_for_port(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "port {port} did not open; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// Header map from a raw response head, lower-cased names.
pub fn raw_headers(raw: &str) -> HashMap<String, String> {
    raw.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}
