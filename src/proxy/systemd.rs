//! systemd service notifications (`sd_notify`): readiness at start, and the new main process
//! after a hand-over.
//!
//! Under `Type=notify` systemd considers the service started once it receives `READY=1`, and it
//! follows the service by its main process id: when that process exits, the service has stopped
//! and whatever else runs in it is killed. A hand-over replaces the main process, so the old
//! gateway, while it still is the main process, names its successor (`MAINPID=`) before it
//! drains and exits. systemd accepts that from the main process (`NotifyAccess=main`, the
//! default) for a successor inside the service, i.e. one the gateway started itself on SIGUSR2.
//!
//! Nothing is sent unless systemd set `NOTIFY_SOCKET`; a failure to send is logged, never fatal.

use std::os::unix::net::UnixDatagram;

/// Tells systemd the gateway serves.
pub fn ready() {
    notify("READY=1");
}

/// Tells systemd that `pid` is the service's main process from now on.
pub fn main_pid(pid: i32) {
    notify(&format!("MAINPID={pid}"));
}

fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = send(&target, state) {
        tracing::warn!(%error, state, "cannot notify systemd");
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    // `@name` is a socket in the abstract namespace
    match target.as_bytes().strip_prefix(b"@") {
        Some(name) => send_abstract(&socket, name, state),
        None => socket.send_to(state.as_bytes(), target).map(drop),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr).map(drop)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket addresses exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn states_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("portcullis-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "MAINPID=42").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=42");
    }
}
