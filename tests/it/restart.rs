//! Zero-downtime restart: `portcullis run --upgrade` takes the listening sockets over from the
//! running binary under steady traffic, failed upgrades leave the old process serving, listeners
//! follow the new config, a successor can itself be upgraded (SIGUSR2), and an HTTP/3 listener,
//! whose UDP socket is not handed over, makes the upgrade give up with the reason.
//!
//! The traffic clients are strict. A client that opens a connection per request counts any
//! error as a failure. A keep-alive client (HTTP/1.1, or HTTP/2 over h2c) does what RFC 9112
//! §9.3.1 (and for HTTP/2 streams the server's `GOAWAY` did not take, RFC 9113 §8.7) allows any
//! HTTP client to do with an idempotent request: when a connection that already carried a
//! response fails the next request before its response head arrives (the server closed it as
//! idle at the moment the request went out), it retries that request once on a new connection.
//! Everything else (an error on a new connection, a failed retry, a timeout, a non-200, a
//! broken body) is a failure.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::support::*;

fn config(port: u16, admin: Option<u16>, upstream: &TestUpstream, extra_listeners: &str) -> String {
    let admin = match admin {
        Some(admin) => format!("admin:\n  bind: 127.0.0.1:{admin}\n"),
        None => "admin:\n  enabled: false\n".into(),
    };
    format!(
        "server:\n  shutdown_timeout: 10s\n  watch_config: false\n  upgrade_socket: upgrade.sock\n  \
         log: {{ format: json }}\n{admin}\
         listeners:\n  - name: main\n    bind: 127.0.0.1:{port}\n{extra_listeners}\
         upstreams:\n  - name: app\n    targets:\n      - url: {}\n\
         routes:\n  - name: all\n    public: true\n    upstream: app\n",
        upstream.url()
    )
}

/// A second `portcullis run` (the successor), its output in its own directory.
struct Successor {
    child: Child,
    log: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Successor {
    fn start(config: &Path, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("successor.log");
        let stderr = dir.path().join("successor.stderr");
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .args(["--workers", "1"])
            .args(flags)
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .expect("start the successor");
        Self {
            child,
            log,
            stderr,
            _dir: dir,
        }
    }

    fn output(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let (log, stderr) = (self.log.clone(), self.stderr.clone());
        exit_of(&mut self.child, within, move || {
            format!(
                "{}{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        })
        .await
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (without blocking the runtime the traffic runs on) for a child to exit.
async fn exit_of(child: &mut Child, within: Duration, output: impl Fn() -> String) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process {} did not exit; output:\n{}",
            child.id(),
            output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn access_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"log\":\"access\""))
        .count()
}

async fn status(port: u16, path: &str) -> u16 {
    send(
        Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await
    .status
}

// === traffic ===

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    /// Keep-alive requests retried on a new connection (RFC 9112 §9.3.1), then successful.
    retried: AtomicUsize,
    failures: Mutex<Vec<String>>,
    /// The slowest successful `/fresh` request, connect included (reported, not asserted).
    slowest_fresh_us: std::sync::atomic::AtomicU64,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// A client connection, HTTP/1.1 or HTTP/2 (h2c with prior knowledge).
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn connect(addr: SocketAddr, h2: bool) -> Result<Self, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(connection);
            Ok(Self::H2(sender))
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(connection);
            Ok(Self::H1(sender))
        }
    }

    /// False once the server closed the connection (or sent HTTP/2 `GOAWAY`).
    async fn usable(&mut self) -> bool {
        match self {
            Self::H1(sender) => sender.ready().await.is_ok(),
            Self::H2(sender) => sender.ready().await.is_ok(),
        }
    }

    async fn send(
        &mut self,
        addr: SocketAddr,
        path: &str,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Self::H1(sender) => {
                let request = Request::get(path)
                    .header("host", addr.to_string())
                    .body(Empty::new())
                    .unwrap();
                sender.send_request(request).await
            }
            Self::H2(sender) => {
                let request = Request::get(format!("http://{addr}{path}"))
                    .body(Empty::new())
                    .unwrap();
                sender.send_request(request).await
            }
        }
    }
}

/// Whether the response head arrived: errors before it may be retried on a reused connection.
enum Outcome {
    Ok,
    BeforeHead(String),
    After(String),
}

async fn exchange(sender: &mut Sender, addr: SocketAddr, path: &str) -> Outcome {
    let response =
        match tokio::time::timeout(Duration::from_secs(10), sender.send(addr, path)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Outcome::BeforeHead(error.to_string()),
            Err(_) => return Outcome::After("no response within 10s".into()),
        };
    let status = response.status();
    match response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
    {
        Ok(body) if status == 200 && body.starts_with(b"upstream saw") => Outcome::Ok,
        Ok(body) => Outcome::After(format!("status {status}: {body:?}")),
        Err(error) => Outcome::After(format!("body: {error}")),
    }
}

/// A new connection for every request: nothing may fail.
async fn fresh_connections(
    addr: SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut sender = match Sender::connect(addr, false).await {
            Ok(sender) => sender,
            Err(error) => {
                tally.fail(format!("fresh: {error}"));
                continue;
            }
        };
        match exchange(&mut sender, addr, path).await {
            Outcome::Ok => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                if path == "/fresh" {
                    let took = started.elapsed().as_micros() as u64;
                    tally.slowest_fresh_us.fetch_max(took, Ordering::Relaxed);
                }
            }
            Outcome::BeforeHead(error) | Outcome::After(error) => {
                tally.fail(format!("fresh: {error}"))
            }
        }
    }
}

/// One connection for as long as the server keeps it; see the module docs for the retry.
async fn keep_alive(addr: SocketAddr, h2: bool, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut current: Option<Sender> = None;
    while !stop.load(Ordering::Relaxed) {
        // a connection the server closed (after a response) is replaced before the next request
        let reusable = match current.as_mut() {
            Some(sender) => sender.usable().await,
            None => false,
        };
        let reused = reusable;
        if !reusable {
            match Sender::connect(addr, h2).await {
                Ok(sender) => current = Some(sender),
                Err(error) => {
                    tally.fail(format!("keep-alive: {error}"));
                    current = None;
                    continue;
                }
            }
        }
        let sender = current.as_mut().expect("connected");
        match exchange(sender, addr, "/keep-alive").await {
            Outcome::Ok => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::BeforeHead(first) if reused => {
                current = None;
                let retry = match Sender::connect(addr, h2).await {
                    Ok(mut sender) => {
                        let outcome = exchange(&mut sender, addr, "/keep-alive").await;
                        current = Some(sender);
                        outcome
                    }
                    Err(error) => Outcome::BeforeHead(error),
                };
                match retry {
                    Outcome::Ok => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        tally.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::BeforeHead(error) | Outcome::After(error) => {
                        tally.fail(format!("keep-alive retry after `{first}`: {error}"))
                    }
                }
            }
            Outcome::BeforeHead(error) | Outcome::After(error) => {
                current = None;
                tally.fail(format!("keep-alive: {error}"))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_traffic_loses_no_request() {
    // slow requests are in flight whenever the switch happens: the old process must finish them
    let upstream = TestUpstream::start(|r| {
        let reply = Reply::ok(&format!("upstream saw {}", r.path_and_query));
        if r.path_and_query.starts_with("/slow") {
            reply.delayed(Duration::from_millis(400))
        } else {
            reply
        }
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut old = GatewayProcess::start(&config(port, Some(admin), &upstream, ""), port);
    let old_pid = old.child.id();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tokio::spawn(fresh_connections(
            addr,
            "/fresh",
            stop.clone(),
            tally.clone(),
        )));
        clients.push(tokio::spawn(keep_alive(
            addr,
            false,
            stop.clone(),
            tally.clone(),
        )));
    }
    for _ in 0..2 {
        clients.push(tokio::spawn(keep_alive(
            addr,
            true,
            stop.clone(),
            tally.clone(),
        )));
    }
    for _ in 0..4 {
        clients.push(tokio::spawn(fresh_connections(
            addr,
            "/slow",
            stop.clone(),
            tally.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before_upgrade = tally.ok.load(Ordering::Relaxed);

    let started = Instant::now();
    let mut new = Successor::start(&old.config, &["--upgrade"]);
    let old_exit = exit_of(&mut old.child, Duration::from_secs(20), || {
        format!(
            "old:\n{}",
            std::fs::read_to_string(&old.log).unwrap_or_default()
        )
    })
    .await;
    let switch = started.elapsed();
    assert!(
        old_exit.success(),
        "old process: {old_exit:?}\n{}",
        old.log_text()
    );
    let at_old_exit = tally.ok.load(Ordering::Relaxed);

    // the new process alone now
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let retried = tally.retried.load(Ordering::Relaxed);
    let failures = tally.failures.lock().unwrap().clone();
    eprintln!(
        "restart under traffic: {ok} ok ({before_upgrade} before the upgrade, {} after the old \
         process exited), {retried} keep-alive retries, {} failures; upgrade to old exit \
         {switch:?}; slowest new-connection request {}ms",
        ok - at_old_exit,
        failures.len(),
        tally.slowest_fresh_us.load(Ordering::Relaxed) / 1000
    );
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:#?}",
        failures.len()
    );
    assert!(
        before_upgrade > 50,
        "too little traffic to mean anything: {before_upgrade}"
    );
    assert!(
        ok - at_old_exit > 50,
        "the new process served {}",
        ok - at_old_exit
    );

    // the new process serves the admin API on the same socket, is ready, and owns the upgrade
    // socket; the old one left the path alone
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "the new process runs: {}",
        new.output()
    );
    let readyz = send(
        Request::get(format!("http://127.0.0.1:{admin}/readyz"))
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(readyz.status, 200, "{}", readyz.body);
    assert!(old.config.with_file_name("upgrade.sock").exists());
    let old_log = old.log_text();
    assert!(
        old_log.contains("handed over to the successor")
            && old_log.contains("\"connections_cut\":0"),
        "{old_log}"
    );
    assert!(
        new.output().contains(&format!("\"old_pid\":{old_pid}")),
        "{}",
        new.output()
    );

    // both processes answered, and every answered request is one the clients counted
    let status = Command::new("kill")
        .args(["-TERM", &new.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let new_exit = new.wait_exit(Duration::from_secs(20)).await;
    assert!(new_exit.success(), "{new_exit:?}\n{}", new.output());
    let (by_old, by_new) = (access_lines(&old_log), access_lines(&new.output()));
    eprintln!("access log: {by_old} requests served by the old process, {by_new} by the new one");
    assert!(by_old > 0 && by_new > 0, "old {by_old}, new {by_new}");
    for (process, log) in [("old", &old_log), ("new", &new.output())] {
        assert!(
            log.contains("\"protocol\":\"HTTP/2"),
            "the {process} process served HTTP/2 too"
        );
    }
    assert_eq!(
        by_old + by_new,
        ok,
        "access-log lines vs successful requests"
    );
}

/// The race the traffic test can only hit by luck, made certain: a connection accepted before
/// draining began whose request arrives after it still gets its answer; an idle keep-alive
/// connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_the_first_request_of_a_connection_accepted_before_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = TestUpstream::echo().await;
    let mut gateway = TestGateway::start(&config_with(&[upstream.url()], "", CATCH_ALL)).await;
    let addr = gateway.addr;
    let mut quiet = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let draining = tokio::spawn(gateway.gateway.take().unwrap().shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle keep-alive connection is closed without a response: {closed:?} {rest:?}"
    );
    quiet
        .write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut response))
        .await
        .expect("the connection closes after its response")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("upstream saw /first"),
        "{response}"
    );
    assert_eq!(draining.await.unwrap(), 0, "no connection was cut");
}

#[tokio::test]
async fn upgrade_without_a_running_gateway_fails_clearly() {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, config(free_port(), None, &upstream, "")).unwrap();
    let mut successor = Successor::start(&path, &["--upgrade"]);
    let exit = successor.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(1), "{}", successor.output());
    let socket = dir.path().join("upgrade.sock");
    assert!(
        successor.output().contains(&format!(
            "error: cannot reach the running gateway's upgrade socket {}",
            socket.display()
        )),
        "{}",
        successor.output()
    );

    // no upgrade socket in the config: nothing to connect to
    std::fs::write(
        &path,
        config(free_port(), None, &upstream, "").replace("  upgrade_socket: upgrade.sock\n", ""),
    )
    .unwrap();
    let mut successor = Successor::start(&path, &["--upgrade"]);
    let exit = successor.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(1), "{}", successor.output());
    assert!(
        successor
            .output()
            .contains("error: --upgrade needs `server.upgrade_socket`"),
        "{}",
        successor.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_old_gateway_serving() {
    let upstream = TestUpstream::echo().await;
    let port = free_port();
    let mut old = GatewayProcess::start(&config(port, None, &upstream, ""), port);
    let socket = old.config.with_file_name("upgrade.sock");
    let dir = tempfile::tempdir().unwrap();
    let new_config = dir.path().join("new.yaml");
    let with_socket = |yaml: String| {
        yaml.replace(
            "upgrade_socket: upgrade.sock",
            &format!("upgrade_socket: {}", socket.display()),
        )
    };

    // an invalid config is refused before the old process is contacted
    std::fs::write(
        &new_config,
        with_socket(config(port, None, &upstream, ""))
            .replace("upstream: app\n", "upstream: nowhere\n"),
    )
    .unwrap();
    let mut successor = Successor::start(&new_config, &["--upgrade"]);
    let exit = successor.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(1), "{}", successor.output());
    assert!(
        successor.output().contains("error: invalid config")
            && successor.output().contains("unknown upstream `nowhere`"),
        "{}",
        successor.output()
    );
    assert!(
        !old.log_text().contains("upgrade requested"),
        "{}",
        old.log_text()
    );

    // a config that fails after the sockets were handed over (a new listener's port is taken)
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    std::fs::write(
        &new_config,
        with_socket(config(
            port,
            None,
            &upstream,
            &format!("  - name: extra\n    bind: 127.0.0.1:{taken_port}\n"),
        )),
    )
    .unwrap();
    let mut successor = Successor::start(&new_config, &["--upgrade"]);
    let exit = successor.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(1), "{}", successor.output());
    assert!(
        successor.output().contains(&format!(
            "error: upgrade abandoned, the running gateway was left as it was: cannot bind \
             listener `extra` on 127.0.0.1:{taken_port}"
        )),
        "{}",
        successor.output()
    );
    old.wait_for_log("upgrade failed; this gateway keeps serving");
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "{}",
        old.log_text()
    );
    assert_eq!(status(port, "/still").await, 200);
    assert!(
        socket.exists(),
        "the old process still owns its upgrade socket"
    );

    // and it can still be upgraded
    drop(taken);
    std::fs::write(&new_config, with_socket(config(port, None, &upstream, ""))).unwrap();
    let _successor = Successor::start(&new_config, &["--upgrade"]);
    let exit = exit_of(&mut old.child, Duration::from_secs(20), || {
        std::fs::read_to_string(&old.log).unwrap_or_default()
    })
    .await;
    assert!(exit.success(), "{exit:?}\n{}", old.log_text());
    assert_eq!(status(port, "/after").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_the_new_config_and_sigusr2_upgrades_again() {
    let upstream = TestUpstream::echo().await;
    let (port, dropped, added) = (free_port(), free_port(), free_port());
    // stands in for systemd's notification socket
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notifications = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notifications.set_nonblocking(true).unwrap();
    let mut old = GatewayProcess::start_with_env(
        &config(
            port,
            None,
            &upstream,
            &format!("  - name: legacy\n    bind: 127.0.0.1:{dropped}\n"),
        ),
        port,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    old.wait_for_port(dropped);
    std::fs::write(
        &old.config,
        config(
            port,
            None,
            &upstream,
            &format!("  - name: fresh\n    bind: 127.0.0.1:{added}\n"),
        ),
    )
    .unwrap();
    let mut new = Successor::start(&old.config, &["--upgrade"]);
    let exit = exit_of(&mut old.child, Duration::from_secs(20), || {
        std::fs::read_to_string(&old.log).unwrap_or_default()
    })
    .await;
    assert!(exit.success(), "{exit:?}\n{}", old.log_text());
    assert_eq!(status(port, "/kept").await, 200);
    assert_eq!(status(added, "/added").await, 200);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", dropped)).is_err(),
        "the listener the new config dropped is closed"
    );
    assert!(
        new.output()
            .contains("not in this config: closing the socket handed over"),
        "{}",
        new.output()
    );
    // systemd heard that the gateway was ready, then that the successor is the main process
    let mut received = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = notifications.recv(&mut buf) {
        received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(
        received,
        ["READY=1".to_owned(), format!("MAINPID={}", new.child.id())]
    );

    // SIGUSR2 makes the new process start its own successor with the same config
    let status_code = Command::new("kill")
        .args(["-USR2", &new.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status_code.success());
    let exit = new.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}\n{}", new.output());
    // the third process writes to the second one's output
    let third: u32 = new
        .output()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "SIGUSR2: started a successor")
        .and_then(|line| line["successor"].as_u64())
        .expect("the successor's pid is logged") as u32;
    // gone, or a zombie its new parent has not reaped yet
    let third_alive = || {
        std::fs::read_to_string(format!("/proc/{third}/stat")).is_ok_and(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
    };
    assert!(third_alive());
    assert_eq!(status(port, "/third").await, 200);
    assert_eq!(status(added, "/third").await, 200);
    let second = new.child.id();
    assert!(
        new.output().contains(&format!("\"old_pid\":{second}")),
        "the third process took over from the second: {}",
        new.output()
    );
    let status_code = Command::new("kill")
        .args(["-TERM", &third.to_string()])
        .status()
        .unwrap();
    assert!(status_code.success());
    assert!(
        eventually(Duration::from_secs(20), || !third_alive()).await,
        "the third process stops on SIGTERM"
    );
    assert!(
        !old.config.with_file_name("upgrade.sock").exists(),
        "the last owner removed the upgrade socket at exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_listener_is_not_handed_over_and_the_upgrade_says_why() {
    let upstream = TestUpstream::echo().await;
    let port = free_port();
    let certs = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    let with_http3 = |yaml: String| {
        yaml.replace(
            &format!("    bind: 127.0.0.1:{port}\n"),
            &format!(
                "    bind: 127.0.0.1:{port}\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n    http3: true\n",
                cert.display(),
                key.display()
            ),
        )
    };
    let mut old = GatewayProcess::start(&with_http3(config(port, None, &upstream, "")), port);
    let socket = old.config.with_file_name("upgrade.sock");
    let dir = tempfile::tempdir().unwrap();
    let new_config = dir.path().join("new.yaml");
    std::fs::write(
        &new_config,
        with_http3(config(port, None, &upstream, "")).replace(
            "upgrade_socket: upgrade.sock",
            &format!("upgrade_socket: {}", socket.display()),
        ),
    )
    .unwrap();

    let mut successor = Successor::start(&new_config, &["--upgrade"]);
    let exit = successor.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(1), "{}", successor.output());
    assert!(
        successor
            .output()
            .contains("the running gateway holds this listener's UDP port for HTTP/3"),
        "{}",
        successor.output()
    );
    old.wait_for_log("upgrade failed; this gateway keeps serving");
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "{}",
        old.log_text()
    );
}
