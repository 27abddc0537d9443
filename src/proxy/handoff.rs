//! Zero-downtime restart: a running gateway hands its listening sockets to its successor.
//!
//! A gateway with `server.upgrade_socket` set listens on that Unix socket. A new process started
//! with `portcullis run --upgrade` connects to it and the two exchange four messages:
//!
//! 1. new → old `hello`: the protocol version;
//! 2. old → new `offer`: every listening socket (the gateway's listeners and the admin listener),
//!    described by role, name and address, the descriptors themselves passed with `SCM_RIGHTS`;
//! 3. new → old `ready`: the new gateway accepts on them. They are the same kernel sockets, so
//!    both processes now take connections from one accept queue;
//! 4. old → new `draining`: the old gateway has stopped accepting; it finishes its requests and
//!    exits, and the new one takes over the upgrade socket's path.
//!
//! **Nothing changes for the old process before `ready`.** Whatever goes wrong until then (the
//! new config does not compile, a new address cannot be bound, the new process dies or takes too
//! long) only closes the new process's copies of the sockets: the old one keeps serving, and the
//! new one exits with an error.
//!
//! **Why the same descriptors, not `SO_REUSEPORT`.** A second socket bound to the port has an
//! accept queue of its own, and the connections waiting in the old queue are reset when the old
//! socket closes. Passing the descriptor keeps one queue: a connection the kernel completed is
//! accepted by one process or the other, never dropped.
//!
//! **Who may connect.** Only a process of the same user (or root), checked with `SO_PEERCRED`
//! on both ends; the socket file is also made `0600`. Whoever may connect can take the listening
//! sockets, so this is the same trust as being able to signal the process.
//!
//! Wire format: each message is a 4-byte big-endian length and a JSON object; the descriptors
//! travel with the first byte of the `offer`.

use std::{
    fs::Permissions,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::Interest,
    net::{UnixListener, UnixStream},
};

/// Bumped when the messages change incompatibly; both ends must agree.
pub const PROTOCOL_VERSION: u32 = 1;
/// How long the old process waits for `ready` after its `offer`: the new process compiles its
/// config, reads its key files and starts its workers in between.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long either side waits for any other message (each is a round trip on one machine).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel's limit on descriptors in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
const MAX_SOCKETS: usize = 253;
/// No message comes near this; a larger length means the peer is not speaking this protocol.
const MAX_MESSAGE: usize = 1 << 20;

/// Why a hand-over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "cannot reach the running gateway's upgrade socket {path}: {source} (is a gateway \
         running with `server.upgrade_socket` set to this path?)"
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot listen on the upgrade socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error(
        "the upgrade socket {0} belongs to a running gateway: start with `--upgrade` to take \
         over from it, or stop it first"
    )]
    InUse(PathBuf),
    #[error("upgrade connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the other process closed the upgrade connection while this one waited for `{0}`")]
    Closed(&'static str),
    #[error("no `{0}` from the other process within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("upgrade protocol error: {0}")]
    Protocol(String),
    #[error("the other process refused the upgrade: {0}")]
    Refused(String),
    #[error(
        "refusing the upgrade peer (pid {pid}): it runs as uid {uid}, this process as uid {ours}"
    )]
    Forbidden { pid: i32, uid: u32, ours: u32 },
    #[error("the hand-over needs Linux (it checks the peer's credentials with SO_PEERCRED)")]
    Unsupported,
    #[error("cancelled: this gateway is stopping")]
    Cancelled,
}

/// What a handed-over socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// One of `listeners[]`.
    Listener,
    /// The admin API's listener.
    Admin,
}

/// A listening socket as the `offer` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    pub role: Role,
    /// The listener's name (`admin` for the admin listener).
    pub name: String,
    /// The address in the old config (port 0 allowed).
    pub configured: SocketAddr,
    /// The address actually bound.
    pub local: SocketAddr,
}

/// A listening socket and its description: what the old process offers, the new one receives.
#[derive(Debug)]
pub struct HandedSocket {
    pub info: SocketInfo,
    pub socket: std::net::TcpListener,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello { version: u32 },
    Offer { sockets: Vec<SocketInfo> },
    Ready,
    Draining,
    Refused { reason: String },
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Offer { .. } => "offer",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Refused { .. } => "refused",
        }
    }
}

// === the old process's end ===

/// The running gateway's upgrade socket.
#[derive(Debug)]
pub struct UpgradeListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this process created: at exit it removes the file only
    /// if it is still that one (after a hand-over the path belongs to the successor).
    identity: Option<(u64, u64)>,
}

impl UpgradeListener {
    /// Listens on `path` for a gateway that starts on its own. A socket file left behind by a
    /// gateway that is gone is replaced; one that a live gateway answers on is refused: two
    /// gateways on one path would make an upgrade take over from whichever answers.
    pub async fn bind(path: &Path) -> Result<Self, HandoffError> {
        if is_socket(path) && UnixStream::connect(path).await.is_ok() {
            return Err(HandoffError::InUse(path.to_owned()));
        }
        Self::take_over(path)
    }

    /// Listens on `path` in place of the socket file there: the successor's step once the old
    /// gateway is draining.
    pub fn take_over(path: &Path) -> Result<Self, HandoffError> {
        let failed = |source| HandoffError::Listen {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(failed)?
            }
            Ok(_) => {
                return Err(failed(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(failed)?;
        std::fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(failed)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            identity: file_identity(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next process to connect; one of another user is refused (an error here is
    /// about that one connection, the listener carries on).
    pub async fn accept(&self) -> Result<Successor, HandoffError> {
        let (stream, _) = self.listener.accept().await?;
        let pid = check_peer(&stream)?;
        Ok(Successor { stream, pid })
    }

    /// Gives up the socket file: after a hand-over it is the successor's, and it may replace it
    /// at any moment.
    pub fn relinquish(&mut self) {
        self.identity = None;
    }
}

impl Drop for UpgradeListener {
    fn drop(&mut self) {
        if self.identity.is_some() && file_identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A process that connected to the upgrade socket, before anything was handed over.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    pid: i32,
}

impl Successor {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the process it cannot have the sockets now (best effort: it may be gone already).
    pub async fn refuse(self, reason: &str) {
        let message = Message::Refused {
            reason: reason.to_owned(),
        };
        let _ = tokio::time::timeout(STEP_TIMEOUT, send(&self.stream, &message, &[])).await;
    }

    /// The old process's side up to the successor's `ready`: reads its `hello`, sends `sockets`,
    /// waits until it accepts on them. Until this returns `Ok` nothing has changed for this
    /// process; `sockets` are copies, and the successor's copies close with it if it fails.
    /// When `cancelled` completes first (this gateway is stopping), the successor is told so.
    pub async fn hand_over(
        self,
        sockets: Vec<HandedSocket>,
        cancelled: impl std::future::Future<Output = ()>,
    ) -> Result<Accepting, HandoffError> {
        let Self { stream, pid } = self;
        tokio::select! {
            ready = offer(&stream, sockets) => ready.map(|()| Accepting { stream, pid }),
            () = cancelled => {
                let refusal = Message::Refused {
                    reason: "the running gateway is stopping".into(),
                };
                let _ = tokio::time::timeout(STEP_TIMEOUT, send(&stream, &refusal, &[])).await;
                Err(HandoffError::Cancelled)
            }
        }
    }
}

/// The old process's steps: `hello` in, `offer` out, `ready` in.
async fn offer(stream: &UnixStream, sockets: Vec<HandedSocket>) -> Result<(), HandoffError> {
    match receive_within(stream, "hello", STEP_TIMEOUT).await? {
        (Message::Hello { version }, _) if version == PROTOCOL_VERSION => {}
        (Message::Hello { version }, _) => {
            let reason = format!(
                "protocol version {version} is not this gateway's {PROTOCOL_VERSION}: \
                 upgrade through a stop and start"
            );
            let refusal = Message::Refused {
                reason: reason.clone(),
            };
            let _ = send(stream, &refusal, &[]).await;
            return Err(HandoffError::Protocol(reason));
        }
        (other, _) => return Err(unexpected("hello", &other)),
    }
    if sockets.len() > MAX_SOCKETS {
        let reason = format!(
            "{} sockets; at most {MAX_SOCKETS} can be handed over",
            sockets.len()
        );
        let refusal = Message::Refused {
            reason: reason.clone(),
        };
        let _ = send(stream, &refusal, &[]).await;
        return Err(HandoffError::Protocol(reason));
    }
    let offer = Message::Offer {
        sockets: sockets.iter().map(|s| s.info.clone()).collect(),
    };
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.socket.as_fd()).collect();
    send(stream, &offer, &fds).await?;
    drop(fds);
    // the successor holds its own descriptors now; these copies are not needed
    drop(sockets);
    match receive_within(stream, "ready", READY_TIMEOUT).await {
        Ok((Message::Ready, _)) => Ok(()),
        Ok((Message::Refused { reason }, _)) => Err(HandoffError::Refused(reason)),
        Ok((other, _)) => Err(unexpected("ready", &other)),
        Err(error) => {
            if matches!(error, HandoffError::Timeout(..)) {
                // a late `ready` must not find the connection open, as if it were accepted
                let refusal = Message::Refused {
                    reason: "too late: this gateway keeps serving".into(),
                };
                let _ = send(stream, &refusal, &[]).await;
            }
            Err(error)
        }
    }
}

/// A successor that accepts on the handed-over sockets and waits for this process to stop.
#[derive(Debug)]
pub struct Accepting {
    stream: UnixStream,
    pid: i32,
}

impl Accepting {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the successor this process has stopped accepting (call it after stopping), so it
    /// may take over the upgrade socket.
    pub async fn confirm(self) -> Result<(), HandoffError> {
        tokio::time::timeout(STEP_TIMEOUT, send(&self.stream, &Message::Draining, &[]))
            .await
            .map_err(|_| HandoffError::Timeout("draining sent", STEP_TIMEOUT))?
    }
}

// === the new process's end ===

/// The new process's end: connected to the old gateway, holding copies of its sockets.
#[derive(Debug)]
pub struct Upgrade {
    stream: UnixStream,
    old_pid: i32,
    sockets: InheritedSockets,
}

impl Upgrade {
    /// Connects to the running gateway's upgrade socket and receives its listening sockets.
    pub async fn connect(path: &Path) -> Result<Self, HandoffError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| HandoffError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let old_pid = check_peer(&stream)?;
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
        };
        tokio::time::timeout(STEP_TIMEOUT, send(&stream, &hello, &[]))
            .await
            .map_err(|_| HandoffError::Timeout("hello sent", STEP_TIMEOUT))??;
        let (infos, fds) = match receive_within(&stream, "offer", STEP_TIMEOUT).await? {
            (Message::Offer { sockets }, fds) => (sockets, fds),
            (Message::Refused { reason }, _) => return Err(HandoffError::Refused(reason)),
            (other, _) => return Err(unexpected("offer", &other)),
        };
        if infos.len() != fds.len() {
            return Err(HandoffError::Protocol(format!(
                "the offer describes {} sockets but carries {} descriptors",
                infos.len(),
                fds.len()
            )));
        }
        let sockets = infos
            .into_iter()
            .zip(fds)
            .map(|(info, fd)| listening_socket(info, fd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            stream,
            old_pid,
            sockets: InheritedSockets { sockets },
        })
    }

    pub fn old_pid(&self) -> i32 {
        self.old_pid
    }

    /// The sockets received, for the new gateway to take what its config needs.
    pub fn sockets(&mut self) -> &mut InheritedSockets {
        &mut self.sockets
    }

    /// Tells the old gateway this one accepts on the sockets, and waits until it has stopped.
    /// Call it once everything that could fail is done: after `ready` the old process stops
    /// accepting for good.
    ///
    /// Errors mean the old gateway did not stop (it refused, or timed out waiting): it keeps
    /// serving and this process should drain and exit. One exception is handled here: if the
    /// old process vanished without a word (it crashed, or was killed), this one is the only
    /// gateway left and the hand-over counts as done.
    pub async fn finish(mut self) -> Result<(), HandoffError> {
        // sockets the new config did not take close now, before the old process lets go of them
        self.sockets.sockets.clear();
        let sent =
            tokio::time::timeout(STEP_TIMEOUT, send(&self.stream, &Message::Ready, &[])).await;
        let answer = match sent {
            Ok(Ok(())) => receive_within(&self.stream, "draining", STEP_TIMEOUT).await,
            // the old process closed the connection; it may have said why first
            Ok(Err(_)) | Err(_) => {
                receive_within(&self.stream, "draining", Duration::from_millis(100))
                    .await
                    .map_err(|_| HandoffError::Closed("draining"))
            }
        };
        match answer {
            Ok((Message::Draining, _)) => Ok(()),
            Ok((Message::Refused { reason }, _)) => Err(HandoffError::Refused(reason)),
            Ok((other, _)) => Err(unexpected("draining", &other)),
            Err(HandoffError::Closed(step)) => {
                // give a dying process a moment to be reaped before asking whether it exists
                for _ in 0..10 {
                    if !process_exists(self.old_pid) {
                        tracing::warn!(
                            old_pid = self.old_pid,
                            "the old gateway exited without confirming the hand-over; this one \
                             keeps serving"
                        );
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(HandoffError::Closed(step))
            }
            Err(error) => Err(error),
        }
    }
}

/// The old gateway's sockets, for the new gateway's listeners to take by name and address.
#[derive(Debug, Default)]
pub struct InheritedSockets {
    sockets: Vec<HandedSocket>,
}

impl InheritedSockets {
    /// The socket for listener `name` at `bind`: the old listener of that name if its configured
    /// address is the same; otherwise (a renamed listener, or one moved to the port the old one
    /// was given for port 0) an old listener on exactly that address. `None`: bind a new socket.
    pub fn take_listener(&mut self, name: &str, bind: SocketAddr) -> Option<HandedSocket> {
        self.take(|info| {
            info.role == Role::Listener && info.name == name && info.configured == bind
        })
        .or_else(|| self.take(|info| info.role == Role::Listener && serves_address(info, bind)))
    }

    /// The old admin listener, if it is on `bind`.
    pub fn take_admin(&mut self, bind: SocketAddr) -> Option<HandedSocket> {
        self.take(|info| {
            info.role == Role::Admin && (info.configured == bind || serves_address(info, bind))
        })
    }

    /// The sockets nothing took yet (closed when this is dropped or the hand-over finishes).
    pub fn remaining(&self) -> impl Iterator<Item = &SocketInfo> {
        self.sockets.iter().map(|s| &s.info)
    }

    fn take(&mut self, wanted: impl Fn(&SocketInfo) -> bool) -> Option<HandedSocket> {
        let index = self.sockets.iter().position(|s| wanted(&s.info))?;
        Some(self.sockets.remove(index))
    }
}

/// A socket bound to a fixed port matches that exact address, configured or actual.
fn serves_address(info: &SocketInfo, bind: SocketAddr) -> bool {
    bind.port() != 0 && (info.configured == bind || info.local == bind)
}

fn listening_socket(info: SocketInfo, fd: OwnedFd) -> Result<HandedSocket, HandoffError> {
    let listening = rustix::net::sockopt::socket_acceptconn(&fd).map_err(io::Error::from)?;
    if !listening {
        return Err(HandoffError::Protocol(format!(
            "the descriptor offered for `{}` is not a listening socket",
            info.name
        )));
    }
    let socket = std::net::TcpListener::from(fd);
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    if local != info.local {
        return Err(HandoffError::Protocol(format!(
            "the socket offered for `{}` is bound to {local}, not {} as described",
            info.name, info.local
        )));
    }
    Ok(HandedSocket { info, socket })
}

// === shared ===

/// The peer's pid, if it runs as this process's user or as root.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn check_peer(stream: &UnixStream) -> Result<i32, HandoffError> {
    let peer = rustix::net::sockopt::socket_peercred(stream).map_err(io::Error::from)?;
    let ours = rustix::process::geteuid();
    let pid = peer.pid.as_raw_nonzero().get();
    if peer.uid != ours && !peer.uid.is_root() {
        return Err(HandoffError::Forbidden {
            pid,
            uid: peer.uid.as_raw(),
            ours: ours.as_raw(),
        });
    }
    Ok(pid)
}

/// Without `SO_PEERCRED` the peer cannot be vetted, so there is no hand-over.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn check_peer(_: &UnixStream) -> Result<i32, HandoffError> {
    Err(HandoffError::Unsupported)
}

fn process_exists(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        // EPERM still means it exists
        Some(pid) => !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

fn unexpected(expected: &str, got: &Message) -> HandoffError {
    HandoffError::Protocol(format!("expected `{expected}`, got `{}`", got.name()))
}

/// Writes one message; `fds` ride with its first byte.
async fn send(
    stream: &UnixStream,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoffError> {
    let body = serde_json::to_vec(message).map_err(|e| HandoffError::Protocol(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoffError::Protocol(
            "too many descriptors for one message".into(),
        ));
    }
    let mut written = 0;
    while written < frame.len() {
        let rest = &frame[written..];
        written += stream
            .async_io(Interest::WRITABLE, || {
                rustix::net::sendmsg(
                    stream,
                    &[IoSlice::new(rest)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?;
        // the descriptors went with the first bytes
        control.clear();
    }
    Ok(())
}

async fn receive_within(
    stream: &UnixStream,
    expecting: &'static str,
    within: Duration,
) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
    tokio::time::timeout(within, receive(stream, expecting))
        .await
        .map_err(|_| HandoffError::Timeout(expecting, within))?
}

/// Reads one message and the descriptors that came with it.
async fn receive(
    stream: &UnixStream,
    expecting: &'static str,
) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
    let mut header = [0u8; 4];
    // read the first bytes alone: descriptors come with the first byte of a message, and the
    // kernel does not merge bytes that carry descriptors with bytes before them
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = stream
        .async_io(Interest::READABLE, || {
            rustix::net::recvmsg(
                stream,
                &mut [IoSliceMut::new(&mut header)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)
        })
        .await?;
    if received.bytes == 0 {
        return Err(HandoffError::Closed(expecting));
    }
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.flags.contains(ReturnFlags::CTRUNC) {
        return Err(HandoffError::Protocol(
            "more descriptors than the protocol allows".into(),
        ));
    }
    read_exact(stream, &mut header[received.bytes..], expecting).await?;
    let length = u32::from_be_bytes(header) as usize;
    if length > MAX_MESSAGE {
        return Err(HandoffError::Protocol(format!(
            "a {length}-byte message: the peer does not speak this protocol"
        )));
    }
    let mut body = vec![0; length];
    read_exact(stream, &mut body, expecting).await?;
    let message = serde_json::from_slice(&body)
        .map_err(|e| HandoffError::Protocol(format!("unreadable message: {e}")))?;
    Ok((message, fds))
}

async fn read_exact(
    stream: &UnixStream,
    mut buf: &mut [u8],
    expecting: &'static str,
) -> Result<(), HandoffError> {
    while !buf.is_empty() {
        stream.readable().await?;
        match stream.try_read(buf) {
            Ok(0) => return Err(HandoffError::Closed(expecting)),
            Ok(n) => buf = &mut buf[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(role: Role, name: &str, configured: &str) -> HandedSocket {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        HandedSocket {
            info: SocketInfo {
                role,
                name: name.into(),
                configured: configured.parse().unwrap(),
                local: socket.local_addr().unwrap(),
            },
            socket,
        }
    }

    #[test]
    fn listeners_are_matched_by_name_and_address_then_by_address() {
        let a = listener(Role::Listener, "a", "127.0.0.1:0");
        let a_local = a.info.local;
        let b = listener(Role::Listener, "b", "127.0.0.1:0");
        let b_local = b.info.local;
        let admin = listener(Role::Admin, "admin", "127.0.0.1:0");
        let admin_local = admin.info.local;
        let mut inherited = InheritedSockets {
            sockets: vec![a, b, admin],
        };
        // same name, same configured address (port 0 included)
        let taken = inherited
            .take_listener("a", "127.0.0.1:0".parse().unwrap())
            .unwrap();
        assert_eq!(taken.info.local, a_local);
        // a renamed listener on the port the old one was given
        let taken = inherited.take_listener("renamed", b_local).unwrap();
        assert_eq!(taken.info.name, "b");
        // a new address: nothing to take (and the admin socket is not a listener)
        assert!(inherited
            .take_listener("c", "127.0.0.1:0".parse().unwrap())
            .is_none());
        assert!(inherited.take_listener("admin", admin_local).is_none());
        assert!(inherited.take_admin(admin_local).is_some());
        assert_eq!(inherited.remaining().count(), 0);
    }

    #[tokio::test]
    async fn sockets_cross_the_connection_and_accept_there() {
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let offered = vec![
            listener(Role::Listener, "main", "127.0.0.1:0"),
            listener(Role::Admin, "admin", "127.0.0.1:0"),
        ];
        let main_addr = offered[0].info.local;
        let successor = Successor {
            stream: old_end,
            pid: 1,
        };
        let old = tokio::spawn(successor.hand_over(offered, std::future::pending()));
        send(
            &new_end,
            &Message::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )
        .await
        .unwrap();
        let (message, fds) = receive(&new_end, "offer").await.unwrap();
        let Message::Offer { sockets } = message else {
            panic!("expected an offer, got {message:?}")
        };
        assert_eq!(sockets.len(), 2);
        assert_eq!(fds.len(), 2);
        let received: Vec<HandedSocket> = sockets
            .into_iter()
            .zip(fds)
            .map(|(info, fd)| listening_socket(info, fd).unwrap())
            .collect();
        assert_eq!(received[0].info.name, "main");
        assert_eq!(received[1].info.role, Role::Admin);
        // the received descriptor is the same socket: a connection to it is accepted here
        let client = std::net::TcpStream::connect(main_addr).unwrap();
        received[0].socket.set_nonblocking(false).unwrap();
        let (_, peer) = received[0].socket.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        send(&new_end, &Message::Ready, &[]).await.unwrap();
        let accepting = old.await.unwrap().unwrap();
        accepting.confirm().await.unwrap();
        let (message, _) = receive(&new_end, "draining").await.unwrap();
        assert!(matches!(message, Message::Draining), "{message:?}");
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_and_nothing_is_sent() {
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let successor = Successor {
            stream: old_end,
            pid: 1,
        };
        let main = listener(Role::Listener, "main", "127.0.0.1:0");
        let old = tokio::spawn(successor.hand_over(vec![main], std::future::pending()));
        send(&new_end, &Message::Hello { version: 99 }, &[])
            .await
            .unwrap();
        let (message, fds) = receive(&new_end, "offer").await.unwrap();
        assert!(matches!(message, Message::Refused { .. }), "{message:?}");
        assert!(fds.is_empty());
        assert!(matches!(old.await.unwrap(), Err(HandoffError::Protocol(_))));
    }

    #[tokio::test]
    async fn a_successor_that_goes_away_before_ready_changes_nothing() {
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let successor = Successor {
            stream: old_end,
            pid: 1,
        };
        let main = listener(Role::Listener, "main", "127.0.0.1:0");
        let old = tokio::spawn(successor.hand_over(vec![main], std::future::pending()));
        send(
            &new_end,
            &Message::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )
        .await
        .unwrap();
        let _ = receive(&new_end, "offer").await.unwrap();
        drop(new_end);
        assert!(matches!(
            old.await.unwrap(),
            Err(HandoffError::Closed("ready"))
        ));
    }

    #[tokio::test]
    async fn a_stopping_gateway_cancels_the_hand_over_and_says_so() {
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let successor = Successor {
            stream: old_end,
            pid: 1,
        };
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        let main = listener(Role::Listener, "main", "127.0.0.1:0");
        let old = tokio::spawn(successor.hand_over(vec![main], async move {
            let _ = cancelled.await;
        }));
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
        };
        send(&new_end, &hello, &[]).await.unwrap();
        let _ = receive(&new_end, "offer").await.unwrap();
        cancel.send(()).unwrap();
        assert!(matches!(old.await.unwrap(), Err(HandoffError::Cancelled)));
        let (message, _) = receive(&new_end, "draining").await.unwrap();
        assert!(
            matches!(&message, Message::Refused { reason } if reason.contains("stopping")),
            "{message:?}"
        );
    }

    #[tokio::test]
    async fn a_successor_gives_up_unless_the_old_process_is_gone() {
        let upgrade = |stream, old_pid| Upgrade {
            stream,
            old_pid,
            sockets: InheritedSockets::default(),
        };
        // refused: give up
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let refusal = Message::Refused {
            reason: "too late".into(),
        };
        send(&old_end, &refusal, &[]).await.unwrap();
        let finished = upgrade(new_end, std::process::id() as i32).finish().await;
        assert!(matches!(finished, Err(HandoffError::Refused(r)) if r == "too late"));
        // closed without a word by a process that still runs: give up
        let (old_end, new_end) = UnixStream::pair().unwrap();
        drop(old_end);
        let finished = upgrade(new_end, std::process::id() as i32).finish().await;
        assert!(
            matches!(finished, Err(HandoffError::Closed(_))),
            "{finished:?}"
        );
        // closed by a process that no longer exists: this one is the gateway now
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let (old_end, new_end) = UnixStream::pair().unwrap();
        drop(old_end);
        let finished = upgrade(new_end, gone.id() as i32).finish().await;
        assert!(finished.is_ok(), "{finished:?}");
    }

    #[tokio::test]
    async fn the_upgrade_socket_is_private_and_refuses_a_second_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let first = UpgradeListener::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            UpgradeListener::bind(&path).await,
            Err(HandoffError::InUse(_))
        ));
        // a successor takes the path over; the first one then leaves the file alone
        let mut first = first;
        first.relinquish();
        let second = UpgradeListener::take_over(&path).unwrap();
        drop(first);
        assert!(path.exists());
        drop(second);
        assert!(!path.exists(), "removed at exit by its owner");
        // a stale file (no one listening) is replaced
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(UpgradeListener::bind(&path).await.is_ok());
    }
}
