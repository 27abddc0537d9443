//! A client connection's I/O wrapper: the protections hyper does not give on its own.
//!
//! - **Request-head timeout with 408.** A request head must arrive within `header_timeout` of its
//!   first byte (of the accept, for the first request); a slower client gets `408 Request Timeout`
//!   and the connection closes (hyper alone would close silently).
//! - **Idle timeout.** With no request in flight and no bytes for `idle_timeout`, the connection closes.
//! - **Framing conflicts.** hyper silently drops `Content-Length` when `Transfer-Encoding` is also
//!   present (RFC 9112 allows it); a gateway should refuse such smuggling-shaped requests, so the
//!   head is scanned for both and the handler answers 400.
//!
//! The wrapper learns about requests through [`ConnActivity`], shared with the request handler.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::pipeline::ConnActivity;

const RESPONSE_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 66\r\nconnection: close\r\n\r\n{\"error\":\"request_timeout\",\"message\":\"request head took too long\"}";

/// Per-connection flags the handler reads.
#[derive(Debug, Default)]
pub struct ConnFlags {
    /// The current request head carried both `Content-Length` and `Transfer-Encoding`.
    pub framing_conflict: AtomicBool,
    /// Request heads the scanner has seen to their end. A request numbered above this (a
    /// pipelined one, whose head arrived behind another request's bytes) was not scanned.
    pub heads_scanned: std::sync::atomic::AtomicU32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Between requests.
    Idle,
    /// Receiving a request head; `started` is the handler count when it began.
    Head { started: u32 },
    /// A request is being handled (body streaming in or out).
    Busy,
}

/// Wraps a client connection's stream; see the module docs.
///
/// Timing without a clock read per request: a periodic tick (a quarter of the shortest timeout)
/// counts how many whole ticks the current phase has lasted. A phase change is just a counter
/// increment, so the request path never touches the clock or the timer wheel for these timeouts;
/// a timeout fires between 1× and 1.25× its configured value.
pub struct ConnIo<T> {
    inner: T,
    timer: Pin<Box<Sleep>>,
    tick: Duration,
    activity: Arc<ConnActivity>,
    flags: Arc<ConnFlags>,
    phase: Phase,
    /// Incremented on every phase change.
    phase_seq: u64,
    /// `phase_seq` at the last tick, and how many ticks in a row saw it unchanged.
    seen_seq: u64,
    ticks_in_phase: u32,
    header_ticks: u32,
    idle_ticks: u32,
    // `None` for HTTP/2, where heads are frames and the framing checks do not apply
    scanner: Option<HeadScanner>,
}

impl<T> ConnIo<T> {
    /// `http1`: apply the head timeout and framing scan (HTTP/2 gets only the idle timeout).
    /// `accepted`: when the connection was accepted; the first request head is due
    /// `header_timeout` after it (time spent on a TLS handshake or protocol sniffing counts).
    pub fn new(
        inner: T,
        accepted: Instant,
        activity: Arc<ConnActivity>,
        flags: Arc<ConnFlags>,
        header_timeout: Duration,
        idle_timeout: Duration,
        http1: bool,
    ) -> Self {
        let shortest = if http1 {
            header_timeout.min(idle_timeout)
        } else {
            idle_timeout
        };
        let tick = (shortest / 4).max(Duration::from_millis(10));
        let ticks =
            |timeout: Duration| (timeout.as_nanos().div_ceil(tick.as_nanos())).max(1) as u32;
        Self {
            inner,
            timer: Box::pin(tokio::time::sleep_until(accepted + tick)),
            tick,
            activity,
            flags,
            phase: if http1 {
                Phase::Head { started: 0 }
            } else {
                Phase::Idle
            },
            phase_seq: 0,
            seen_seq: 0,
            ticks_in_phase: 0,
            header_ticks: ticks(header_timeout),
            idle_ticks: ticks(idle_timeout),
            scanner: http1.then(HeadScanner::default),
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.phase_seq += 1;
    }

    /// Moves Head → Busy once the handler has the request, and Busy → Idle once nothing is in flight.
    fn refresh_phase(&mut self) {
        let in_flight = self.activity.in_flight();
        match self.phase {
            Phase::Idle if in_flight > 0 => self.enter(Phase::Busy),
            Phase::Head { started } if self.activity.started() != started => {
                self.enter(if in_flight > 0 {
                    Phase::Busy
                } else {
                    Phase::Idle
                });
            }
            Phase::Busy if in_flight == 0 => self.enter(Phase::Idle),
            _ => {}
        }
    }

    /// One tick: has the current phase outlived its timeout?
    fn on_tick(&mut self) -> Option<Phase> {
        self.refresh_phase();
        if self.phase_seq == self.seen_seq {
            self.ticks_in_phase = self.ticks_in_phase.saturating_add(1);
        } else {
            // the phase began within the last tick
            self.seen_seq = self.phase_seq;
            self.ticks_in_phase = 0;
        }
        let limit = match self.phase {
            Phase::Head { .. } => self.header_ticks,
            Phase::Idle => self.idle_ticks,
            Phase::Busy => return None,
        };
        (self.ticks_in_phase >= limit).then_some(self.phase)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.refresh_phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if this.scanner.is_some() {
                    if this.phase == Phase::Idle {
                        // first bytes of a new request head: its clock starts now
                        let started = this.activity.started();
                        this.enter(Phase::Head { started });
                        this.scanner = Some(HeadScanner::default());
                    }
                    if let (Phase::Head { .. }, Some(scanner)) = (this.phase, this.scanner.as_mut())
                    {
                        if scanner.feed(read) {
                            this.flags.framing_conflict.store(true, Ordering::Release);
                        }
                        if scanner.done && !scanner.counted {
                            scanner.counted = true;
                            this.flags.heads_scanned.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
                // HTTP/2 frames while idle (pings, settings) do not count as activity: only
                // requests do, or a client could hold a connection forever with ping answers
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                while this.timer.as_mut().poll(cx).is_ready() {
                    let next = this.timer.deadline() + this.tick;
                    this.timer.as_mut().reset(next);
                    match this.on_tick() {
                        Some(Phase::Head { .. }) => {
                            // best effort: the socket is writable in all but pathological cases
                            let mut inner = Pin::new(&mut this.inner);
                            let _ = inner.as_mut().poll_write(cx, RESPONSE_408);
                            let _ = inner.poll_flush(cx);
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "request head timeout",
                            )));
                        }
                        Some(Phase::Idle) => return Poll::Ready(Ok(())),
                        Some(Phase::Busy) | None => {}
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Finds `Content-Length` and `Transfer-Encoding` header names in a request head, byte by byte,
/// across reads, stopping at the blank line that ends the head.
#[derive(Debug)]
struct HeadScanner {
    /// Position within the current line's name (counting only non-CR bytes).
    column: usize,
    content_length_alive: bool,
    transfer_encoding_alive: bool,
    saw_content_length: bool,
    saw_transfer_encoding: bool,
    first_line: bool,
    done: bool,
    /// `done` has been reported to the connection's flags.
    counted: bool,
}

impl Default for HeadScanner {
    fn default() -> Self {
        Self {
            column: 0,
            content_length_alive: false,
            transfer_encoding_alive: false,
            saw_content_length: false,
            saw_transfer_encoding: false,
            first_line: true,
            done: false,
            counted: false,
        }
    }
}

const CONTENT_LENGTH: &[u8] = b"content-length:";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";

impl HeadScanner {
    /// Feeds bytes; returns true once both headers have been seen in this head.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            if self.done {
                break;
            }
            match byte {
                b'\n' => {
                    if self.column == 0 {
                        if self.first_line {
                            // empty lines before the request line are skipped (as the HTTP
                            // parser does); they neither start nor end the head
                            continue;
                        }
                        self.done = true;
                    }
                    self.first_line = false;
                    self.column = 0;
                    self.content_length_alive = true;
                    self.transfer_encoding_alive = true;
                }
                b'\r' => {}
                _ => {
                    let lower = byte.to_ascii_lowercase();
                    if self.content_length_alive {
                        if CONTENT_LENGTH.get(self.column) == Some(&lower) {
                            if self.column + 1 == CONTENT_LENGTH.len() {
                                self.saw_content_length = true;
                                self.content_length_alive = false;
                            }
                        } else {
                            self.content_length_alive = false;
                        }
                    }
                    if self.transfer_encoding_alive {
                        if TRANSFER_ENCODING.get(self.column) == Some(&lower) {
                            if self.column + 1 == TRANSFER_ENCODING.len() {
                                self.saw_transfer_encoding = true;
                                self.transfer_encoding_alive = false;
                            }
                        } else {
                            self.transfer_encoding_alive = false;
                        }
                    }
                    self.column += 1;
                }
            }
        }
        self.saw_content_length && self.saw_transfer_encoding
    }
}

/// Whether a request head, delivered in these chunks, carries both `Content-Length` and
/// `Transfer-Encoding` (the scanner the connection wrapper runs; exposed for fuzzing).
pub fn head_has_framing_conflict(chunks: &[&[u8]]) -> bool {
    let mut scanner = HeadScanner::default();
    chunks.iter().any(|chunk| scanner.feed(chunk))
}

#[cfg(test)]
mod tests {
    use super::HeadScanner;

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut scanner = HeadScanner::default();
        chunks.iter().any(|chunk| scanner.feed(chunk))
    }

    #[test]
    fn both_framing_headers_are_found_across_reads_and_any_case() {
        assert!(scan(&[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"]));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nTRANSFER-ENC",
            b"ODING: chunked\r\ncontent-le",
            b"ngth: 5\r\n\r\n"
        ]));
    }

    #[test]
    fn empty_lines_before_the_request_line_do_not_hide_the_head() {
        // found by fuzzing: the parser skips leading empty lines, so the scanner must too
        assert!(scan(&[
            b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(scan(&[b"\n\nX\ncontent-length:\ntransfer-encoding:\n"]));
    }

    #[test]
    fn one_framing_header_or_lookalikes_are_fine() {
        assert!(!scan(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Content-Length: 5\r\n\r\n"
        ]));
        // headers of the body or the next request are not part of this head
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 30\r\n\r\nTransfer-Encoding: chunked\r\n"
        ]));
    }
}
