//! Body types on both sides of the gateway: bodies stream through, never buffered whole.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{ClientBody, Completion};
use crate::{
    compression::encode::{EncodedBody, Encoder},
    upstream::UpstreamResponseBody,
};

/// Errors crossing body boundaries (hyper's, or ours for the size limit).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body grew beyond the route's `max_body` while streaming (413 when still possible).
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured limit")]
pub struct BodyTooLarge;

/// A body sent to the client: a small gateway-made body, or the upstream's, streamed.
pub struct ResponseBody {
    kind: ResponseKind,
    /// The request's record; finished (access log, connection accounting) when the body ends.
    completion: Option<Box<Completion>>,
}

enum ResponseKind {
    Full(Option<Bytes>),
    Upstream(UpstreamResponseBody),
    /// An upstream body whose start was read ahead (to be cached, and found too large or ending
    /// in trailers): the bytes read, then the rest of the stream, then the trailers read.
    Replay {
        head: Option<Bytes>,
        rest: Option<UpstreamResponseBody>,
        trailers: Option<http::HeaderMap>,
    },
    /// An upstream body rewritten on its way (protocol translation).
    Transformed(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>),
    /// The upstream's body, compressed as it streams (`compression`).
    Encoded(Box<EncodedBody<UpstreamResponseBody>>),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: ResponseKind::Full(Some(bytes.into())),
            completion: None,
        }
    }

    pub fn empty() -> Self {
        Self {
            kind: ResponseKind::Full(None),
            completion: None,
        }
    }

    /// A body whose first bytes (and possibly its end) were already read from `rest`.
    pub fn replay(
        head: Bytes,
        rest: Option<UpstreamResponseBody>,
        trailers: Option<http::HeaderMap>,
    ) -> Self {
        Self {
            kind: ResponseKind::Replay {
                head: (!head.is_empty()).then_some(head),
                rest,
                trailers,
            },
            completion: None,
        }
    }

    /// A body produced by a translation of the upstream's (e.g. gRPC to gRPC-Web).
    pub fn transformed<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: ResponseKind::Transformed(Box::pin(http_body_util::BodyExt::map_err(
                body,
                Into::into,
            ))),
            completion: None,
        }
    }

    pub fn upstream(body: UpstreamResponseBody) -> Self {
        Self {
            kind: ResponseKind::Upstream(body),
            completion: None,
        }
    }

    /// Compresses the body with `encoder` as it streams. The caller has set the response's
    /// `Content-Encoding`.
    pub fn encoded(self, encoder: Encoder) -> Self {
        let kind = match self.kind {
            ResponseKind::Upstream(body) => {
                ResponseKind::Encoded(Box::new(EncodedBody::new(body, encoder)))
            }
            // a cached, replayed or translated body: compressed all the same, since the caller
            // has already announced the encoding in the head
            other => {
                let inner = Self {
                    kind: other,
                    completion: None,
                };
                ResponseKind::Transformed(Box::pin(http_body_util::BodyExt::map_err(
                    EncodedBody::new(inner, encoder),
                    Into::into,
                )))
            }
        };
        Self { kind, ..self }
    }

    /// Attaches the request's record, which counts bytes sent and is finished when the body ends
    /// (or is dropped because the client went away).
    pub fn with_completion(mut self, completion: Box<Completion>) -> Self {
        self.completion = Some(completion);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let completion = &mut this.completion;
        // the payload capture sees the upstream's bytes, before any compression
        let mut capture = |data: &Bytes| {
            if let Some(capture) = completion
                .as_mut()
                .and_then(|c| c.ctx.response_capture.as_mut())
            {
                capture.append(data);
            }
        };
        let polled = match &mut this.kind {
            ResponseKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseKind::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx).map_err(Into::into);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        capture(data);
                    }
                }
                polled
            }
            ResponseKind::Encoded(body) => body.poll_encoded(cx, capture),
            ResponseKind::Transformed(body) => body.as_mut().poll_frame(cx),
            ResponseKind::Replay {
                head,
                rest,
                trailers,
            } => {
                if let Some(head) = head.take() {
                    Poll::Ready(Some(Ok(Frame::data(head))))
                } else if let Some(body) = rest {
                    match Pin::new(body).poll_frame(cx) {
                        Poll::Ready(None) => {
                            *rest = None;
                            Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
                        }
                        other => other.map_err(Into::into),
                    }
                } else {
                    Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
                }
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // bytes out: what is sent, compressed or not
                if let (Some(completion), Some(data)) = (&mut this.completion, frame.data_ref()) {
                    completion.ctx.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(completion) = &mut this.completion {
                    completion.ctx.response_aborted = true;
                }
                this.completion = None;
            }
            // end of stream: finish the record now rather than when hyper drops the body
            Poll::Ready(None) => this.completion = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full(bytes) => bytes.is_none(),
            ResponseKind::Upstream(body) => body.is_end_stream(),
            ResponseKind::Transformed(body) => body.is_end_stream(),
            ResponseKind::Replay {
                head,
                rest,
                trailers,
            } => head.is_none() && rest.is_none() && trailers.is_none(),
            ResponseKind::Encoded(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ResponseKind::Full(None) => SizeHint::with_exact(0),
            ResponseKind::Upstream(body) => body.size_hint(),
            ResponseKind::Transformed(body) => body.size_hint(),
            ResponseKind::Replay { head, rest, .. } => {
                let head = head.as_ref().map_or(0, |h| h.len() as u64);
                let mut hint = rest.as_ref().map(Body::size_hint).unwrap_or_default();
                hint.set_lower(hint.lower() + head);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + head);
                }
                if rest.is_none() {
                    hint = SizeHint::with_exact(head);
                }
                hint
            }
            // the compressed size is known only at the end
            ResponseKind::Encoded(_) => SizeHint::default(),
        }
    }
}

/// A body sent upstream: nothing (health checks, bodiless requests) or the client's body, streamed
/// with a size limit.
pub enum UpstreamBody {
    Empty,
    /// A small body the gateway itself sends (e.g. a token introspection request).
    Full(Option<Bytes>),
    Client {
        body: ClientBody,
        remaining: u64,
        progress: std::sync::Arc<BodyProgress>,
        /// The first bytes, kept for the access log (`capture_payload`).
        capture: Option<crate::telemetry::payload::SharedCapture>,
    },
}

/// How far a client's request body got: the upstream connection may be reused only once the body
/// has been sent completely, and a failure caused by the client is not the target's fault.
#[derive(Debug, Default)]
pub struct BodyProgress {
    finished: std::sync::atomic::AtomicBool,
    client_failed: std::sync::atomic::AtomicBool,
}

impl BodyProgress {
    pub fn finished(&self) -> bool {
        self.finished.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn client_failed(&self) -> bool {
        self.client_failed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn mark(flag: &std::sync::atomic::AtomicBool) {
        flag.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl UpstreamBody {
    pub fn client(body: ClientBody, limit: u64) -> Self {
        if body.is_end_stream() {
            return Self::Empty;
        }
        Self::Client {
            body,
            remaining: limit,
            progress: Default::default(),
            capture: None,
        }
    }

    /// Keeps the first bytes of a client's body in `capture` as they stream.
    pub fn with_capture(mut self, capture: crate::telemetry::payload::SharedCapture) -> Self {
        if let Self::Client { capture: slot, .. } = &mut self {
            *slot = Some(capture);
        }
        self
    }

    /// The body's progress, when it comes from the client.
    pub fn progress(&self) -> Option<std::sync::Arc<BodyProgress>> {
        match self {
            Self::Empty | Self::Full(_) => None,
            Self::Client { progress, .. } => Some(progress.clone()),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Client {
                body,
                remaining,
                progress,
                capture,
            } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            BodyProgress::mark(&progress.client_failed);
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                        }
                        *remaining -= len;
                        if let Some(capture) = capture {
                            capture
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .append(data);
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(error))) => {
                    BodyProgress::mark(&progress.client_failed);
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(None) => {
                    BodyProgress::mark(&progress.finished);
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(bytes) => bytes.is_none(),
            Self::Client { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Client { body, .. } => body.size_hint(),
        }
    }
}
