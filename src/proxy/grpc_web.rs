//! gRPC-Web ↔ gRPC translation, for browsers and HTTP/1.1 clients that cannot speak HTTP/2 with
//! trailers. A route with `grpc_web: true` accepts `application/grpc-web[+proto]` (binary) and
//! `application/grpc-web-text[+proto]` (base64) requests, sends them to its HTTP/2 upstream as
//! gRPC, and turns the response's trailers into the trailer frame gRPC-Web puts at the end of
//! the body (flag `0x80`, length, `name: value\r\n` lines).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::{
    pipeline::{ClientBody, GatewayError, UpstreamBody},
    upstream::UpstreamResponseBody,
};

const GRPC_WEB: &str = "application/grpc-web";
const GRPC_WEB_TEXT: &str = "application/grpc-web-text";
const TRAILER_FLAG: u8 = 0x80;

/// Which gRPC-Web encoding a request uses (and its response gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Binary,
    /// Base64 bodies, for clients that cannot handle binary streams.
    Text,
}

impl Mode {
    /// The mode of a gRPC-Web request, by its `Content-Type`; `None` for anything else.
    pub fn of(headers: &HeaderMap) -> Option<Self> {
        let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let base = content_type.split(';').next()?.trim();
        let subtype = |prefix: &str| {
            base.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
        };
        if subtype(GRPC_WEB_TEXT) {
            Some(Self::Text)
        } else if subtype(GRPC_WEB) {
            Some(Self::Binary)
        } else {
            None
        }
    }
}

/// Rewrites a gRPC-Web request's headers to gRPC and returns the body to send: the client's,
/// streamed (binary), or decoded from base64 (text: gRPC-Web has no client streaming, so the
/// body is one request message, read whole within `max_body`).
pub async fn request(
    headers: &mut HeaderMap,
    body: ClientBody,
    mode: Mode,
    max_body: u64,
) -> Result<UpstreamBody, GatewayError> {
    if let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let prefix = match mode {
            Mode::Binary => GRPC_WEB,
            Mode::Text => GRPC_WEB_TEXT,
        };
        let grpc = content_type.replacen(prefix, "application/grpc", 1);
        if let Ok(value) = HeaderValue::from_str(&grpc) {
            headers.insert(header::CONTENT_TYPE, value);
        }
    }
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(http::HeaderName::from_static("x-grpc-web"));
    match mode {
        Mode::Binary => Ok(UpstreamBody::client(body, max_body)),
        Mode::Text => {
            let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
            let text = http_body_util::Limited::new(body, limit)
                .collect()
                .await
                .map_err(|_| GatewayError::PayloadTooLarge)?
                .to_bytes();
            let decoded = decode_text(&text)
                .ok_or(GatewayError::BadRequest("grpc-web-text body is not base64"))?;
            Ok(UpstreamBody::Full(Some(decoded)))
        }
    }
}

/// Decodes a `grpc-web-text` request body (the decoder [`request`] runs); `None` when it is not
/// base64. Public only so that the fuzz target `grpc_web_text` can reach it: the module is private.
pub fn decode_grpc_web_text(text: &[u8]) -> Option<Bytes> {
    decode_text(text)
}

/// Decodes a base64 body that may be several padded chunks one after another.
fn decode_text(text: &[u8]) -> Option<Bytes> {
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(compact.len() / 4 * 3);
    let mut start = 0;
    while start < compact.len() {
        // a chunk ends after its padding, or with the input
        let mut end = compact[start..]
            .iter()
            .position(|&b| b == b'=')
            .map_or(compact.len(), |p| start + p);
        while end < compact.len() && compact[end] == b'=' {
            end += 1;
        }
        base64::engine::general_purpose::STANDARD
            .decode_vec(&compact[start..end], &mut out)
            .ok()?;
        start = end;
    }
    Some(Bytes::from(out))
}

/// Rewrites a gRPC response's `Content-Type` for the gRPC-Web client. The body is wrapped with
/// [`GrpcWebBody`] by the caller.
pub fn response_headers(headers: &mut HeaderMap, mode: Mode) {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    if !content_type.starts_with("application/grpc") {
        return;
    }
    let web = match mode {
        Mode::Binary => GRPC_WEB,
        Mode::Text => GRPC_WEB_TEXT,
    };
    let translated = content_type.replacen("application/grpc", web, 1);
    if let Ok(value) = HeaderValue::from_str(&translated) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.remove(header::CONTENT_LENGTH);
}

/// A gRPC response body as gRPC-Web: messages as they come, trailers as the last frame; in text
/// mode all of it base64, with padding only at the very end (bytes that do not fill a 3-byte
/// group wait for the next frame).
pub struct GrpcWebBody {
    inner: Option<UpstreamResponseBody>,
    text: bool,
    /// Text mode: bytes not yet encoded (fewer than 3).
    carry: BytesMut,
}

impl GrpcWebBody {
    pub fn new(inner: UpstreamResponseBody, mode: Mode) -> Self {
        Self {
            inner: Some(inner),
            text: mode == Mode::Text,
            carry: BytesMut::new(),
        }
    }

    fn encode(&mut self, data: &[u8], last: bool) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(data);
        }
        self.carry.extend_from_slice(data);
        let ready = if last {
            self.carry.len()
        } else {
            self.carry.len() / 3 * 3
        };
        let chunk = self.carry.split_to(ready);
        Bytes::from(base64::engine::general_purpose::STANDARD.encode(&chunk))
    }
}

/// The gRPC-Web trailer frame for `trailers`.
fn trailer_frame(trailers: &HeaderMap) -> BytesMut {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(TRAILER_FLAG);
    frame.put_u32(block.len() as u32);
    frame.extend_from_slice(&block);
    frame
}

impl Body for GrpcWebBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => {
                    this.inner = None;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let encoded = this.encode(&data, false);
                        if !encoded.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(encoded))));
                        }
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        this.inner = None;
                        let encoded = this.encode(&trailer_frame(&trailers), true);
                        return Poll::Ready(Some(Ok(Frame::data(encoded))));
                    }
                },
                Poll::Ready(None) => {
                    // no trailers (a trailers-only response carries its status in the head)
                    this.inner = None;
                    let rest = this.encode(&[], true);
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.carry.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_come_from_the_content_type() {
        let mode = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            Mode::of(&headers)
        };
        assert_eq!(mode("application/grpc-web"), Some(Mode::Binary));
        assert_eq!(mode("application/grpc-web+proto"), Some(Mode::Binary));
        assert_eq!(
            mode("application/grpc-web-text+proto; charset=x"),
            Some(Mode::Text)
        );
        assert_eq!(mode("application/grpc"), None);
        assert_eq!(mode("application/grpc-webx"), None);
        assert_eq!(mode("text/plain"), None);
    }

    #[test]
    fn text_bodies_decode_across_padded_chunks() {
        let one = base64::engine::general_purpose::STANDARD.encode(b"ab");
        let two = base64::engine::general_purpose::STANDARD.encode(b"cde");
        let joined = format!("{one}{two}\r\n");
        assert_eq!(&decode_text(joined.as_bytes()).unwrap()[..], b"abcde");
        assert!(decode_text(b"!!!!").is_none());
    }

    #[test]
    fn trailers_become_the_last_frame() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        let frame = trailer_frame(&trailers);
        assert_eq!(frame[0], 0x80);
        let length = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(&frame[5..], b"grpc-status: 0\r\ngrpc-message: ok\r\n");
        assert_eq!(length, frame.len() - 5);
    }
}
