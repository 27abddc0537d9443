//! A real `redis-server` on a free loopback port, for tests of state shared between replicas.

use std::{
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` without persistence. When it is not installed the test is skipped
    /// with a message (returns `None`), except under `CI=true`, where a missing server fails.
    pub fn start() -> Option<Self> {
        Self::start_on(super::free_port())
    }

    /// Starts a server on `port` (again, after `stop`, to test reconnection).
    pub fn start_on(port: u16) -> Option<Self> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("redis-server is required in CI (scripts/deps.sh installs it): {error}")
            }
            Err(error) => {
                eprintln!("SKIPPED: redis-server not available ({error}); run scripts/deps.sh");
                return None;
            }
        };
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        // our server, answering: not merely something listening on the port
        while !server.answers_ping() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server exited ({status}); is port {port} taken?");
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn answers_ping(&mut self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
            && matches!(self.child.try_wait(), Ok(None))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (to test what happens when Redis goes away).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
