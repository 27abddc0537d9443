//! Streaming compression of a response body: frames are compressed as they flow, never buffered
//! whole.
//!
//! **When output is flushed.** Data frames that arrive back to back are compressed together; the
//! encoder is flushed (a sync flush: everything so far decodes) when the upstream pauses (its
//! body is not ready), after every [`FLUSH_AFTER`] bytes of input, and at the end. A streaming
//! response (server-sent events, long polls) therefore reaches the client as promptly as without
//! compression, and a fast bulk body is not chopped into one flush per upstream frame (each flush
//! costs a few bytes and some ratio).
//!
//! The encoders are synchronous (flate2, brotli, zstd writing into a `Vec`): each call does work
//! bounded by the frame at hand, so there is no need for an async adapter around them.

use std::{
    io::{self, Write},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::{config::model::CompressionAlgorithm as Algorithm, pipeline::BoxError};

/// Input compressed between two flushes at most, so one poll does bounded work and the client
/// sees progress on a long body.
pub const FLUSH_AFTER: usize = 64 * 1024;

/// gzip level 6 is zlib's default balance; brotli quality 4 and zstd level 3 are their fast
/// settings for compressing on the fly (the high levels are for static assets, compressed once).
const GZIP_LEVEL: u32 = 6;
const BROTLI_QUALITY: u32 = 4;
/// 1 MiB windows: near the ratio of larger ones for typical responses, and bounded memory per
/// response being compressed (brotli's default is 4 MiB, zstd level 3 takes 2 MiB).
const BROTLI_WINDOW_LOG: u32 = 20;
const ZSTD_LEVEL: i32 = 3;
const ZSTD_WINDOW_LOG: u32 = 20;

/// Why compressing a body failed (the encoders only fail when memory does).
#[derive(Debug, thiserror::Error)]
#[error("compressing the response body failed")]
pub struct EncodeError(#[source] io::Error);

/// One response's compressor.
pub struct Encoder {
    kind: Kind,
}

enum Kind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    /// `None` once finished: brotli's writer finishes only by being consumed.
    Brotli(Option<Box<brotli::CompressorWriter<Vec<u8>>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    pub fn new(algorithm: Algorithm) -> Result<Self, EncodeError> {
        let kind = match algorithm {
            Algorithm::Gzip => Kind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(GZIP_LEVEL),
            )),
            Algorithm::Br => Kind::Brotli(Some(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                BROTLI_QUALITY,
                BROTLI_WINDOW_LOG,
            )))),
            Algorithm::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)
                    .map_err(EncodeError)?;
                encoder.window_log(ZSTD_WINDOW_LOG).map_err(EncodeError)?;
                Kind::Zstd(encoder)
            }
        };
        Ok(Self { kind })
    }

    /// Compresses `data`; what is ready comes out with [`Self::take`] (after a flush, all of it).
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.kind {
            Kind::Gzip(encoder) => encoder.write_all(data),
            Kind::Brotli(Some(encoder)) => encoder.write_all(data),
            Kind::Brotli(None) => Err(finished()),
            Kind::Zstd(encoder) => encoder.write_all(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.kind {
            Kind::Gzip(encoder) => encoder.flush(),
            Kind::Brotli(Some(encoder)) => encoder.flush(),
            Kind::Brotli(None) => Err(finished()),
            Kind::Zstd(encoder) => encoder.flush(),
        }
    }

    /// Ends the compressed stream (its trailer: gzip's CRC and length, the last blocks).
    fn finish(&mut self) -> io::Result<Bytes> {
        match &mut self.kind {
            Kind::Gzip(encoder) => encoder.try_finish()?,
            Kind::Brotli(encoder) => {
                let encoder = encoder.take().ok_or_else(finished)?;
                return Ok(encoder.into_inner().into());
            }
            Kind::Zstd(encoder) => encoder.do_finish()?,
        }
        Ok(self.take())
    }

    /// The compressed bytes produced so far and not yet taken.
    fn take(&mut self) -> Bytes {
        let buffer = match &mut self.kind {
            Kind::Gzip(encoder) => encoder.get_mut(),
            Kind::Brotli(Some(encoder)) => encoder.get_mut(),
            Kind::Brotli(None) => return Bytes::new(),
            Kind::Zstd(encoder) => encoder.get_mut(),
        };
        std::mem::take(buffer).into()
    }
}

fn finished() -> io::Error {
    io::Error::other("the compressed stream has ended")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Streaming,
    /// The compressed stream is complete; trailers (if any) are still to be sent.
    Trailers,
    Done,
}

/// `inner`, compressed as it streams; trailers pass through after the compressed data.
pub struct EncodedBody<B> {
    inner: B,
    encoder: Encoder,
    state: State,
    trailers: Option<HeaderMap>,
    /// Input written since the last flush.
    unflushed: usize,
}

impl<B> EncodedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(inner: B, encoder: Encoder) -> Self {
        Self {
            inner,
            encoder,
            state: State::Streaming,
            trailers: None,
            unflushed: 0,
        }
    }

    /// The next frame to send; `plain` sees each data frame of `inner` before it is compressed
    /// (the access log's payload capture wants what the upstream sent, not compressed bytes).
    pub fn poll_encoded(
        &mut self,
        cx: &mut Context<'_>,
        mut plain: impl FnMut(&Bytes),
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Trailers => {
                    self.state = State::Done;
                    return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                State::Streaming => {}
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        plain(&data);
                        if let Err(error) = self.encoder.write(&data) {
                            return self.fail(error);
                        }
                        self.unflushed += data.len();
                        if self.unflushed >= FLUSH_AFTER {
                            return self.flush();
                        }
                    }
                    Err(frame) => {
                        // trailers end the body: finish the compressed stream before them
                        self.trailers = frame.into_trailers().ok();
                        return self.end();
                    }
                },
                Poll::Ready(Some(Err(error))) => {
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(None) => return self.end(),
                Poll::Pending if self.unflushed > 0 => return self.flush(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn flush(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.unflushed = 0;
        if let Err(error) = self.encoder.flush() {
            return self.fail(error);
        }
        Poll::Ready(Some(Ok(Frame::data(self.encoder.take()))))
    }

    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Trailers;
        match self.encoder.finish() {
            Ok(last) => Poll::Ready(Some(Ok(Frame::data(last)))),
            Err(error) => self.fail(error),
        }
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        Poll::Ready(Some(Err(Box::new(EncodeError(error)))))
    }

    pub fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }
}

impl<B> Body for EncodedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_encoded(cx, |_| {})
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use http_body_util::BodyExt;

    use super::*;

    /// Decompresses `data` with the same crates.
    pub fn decode(algorithm: Algorithm, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match algorithm {
            Algorithm::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Algorithm::Br => {
                brotli::Decompressor::new(data, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Algorithm::Zstd => {
                out = zstd::stream::decode_all(data).unwrap();
            }
        }
        out
    }

    /// A body that plays a script: frames, and `None` for "not ready yet" (waking itself).
    struct Scripted(std::collections::VecDeque<Option<Frame<Bytes>>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                Some(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn script(steps: impl IntoIterator<Item = Option<Frame<Bytes>>>) -> Scripted {
        Scripted(steps.into_iter().collect())
    }

    fn data(text: &[u8]) -> Option<Frame<Bytes>> {
        Some(Frame::data(Bytes::copy_from_slice(text)))
    }

    #[tokio::test]
    async fn a_pause_of_the_upstream_flushes_what_came_before_it() {
        let mut encoded = EncodedBody::new(
            script([
                data(b"data: one\n\n"),
                data(b"data: two\n\n"),
                None,
                data(b"data: three\n\n"),
            ]),
            Encoder::new(Algorithm::Gzip).unwrap(),
        );
        // both frames before the pause come out as one flushed chunk that decodes on its own
        let first = std::future::poll_fn(|cx| encoded.poll_encoded(cx, |_| {}))
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        decoder.write_all(&first).unwrap();
        decoder.flush().unwrap();
        assert_eq!(decoder.get_ref().as_slice(), b"data: one\n\ndata: two\n\n");
        let mut rest = Vec::new();
        let mut plain = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| encoded.poll_encoded(cx, |p| plain.extend_from_slice(p)))
                .await
        {
            rest.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(
            plain, b"data: three\n\n",
            "the plain bytes are seen as they pass"
        );
        decoder.write_all(&rest).unwrap();
        assert_eq!(
            decoder.finish().unwrap(),
            b"data: one\n\ndata: two\n\ndata: three\n\n"
        );
        assert!(encoded.is_end_stream());
    }

    #[tokio::test]
    async fn every_algorithm_round_trips_and_trailers_follow_the_data() {
        let text: Vec<u8> = (0..5000)
            .flat_map(|i| format!("line {i} of a compressible body\n").into_bytes())
            .collect();
        for algorithm in [Algorithm::Gzip, Algorithm::Br, Algorithm::Zstd] {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let steps = text
                .chunks(7000)
                .flat_map(|c| [data(c), None])
                .chain([Some(Frame::trailers(trailers.clone()))]);
            let encoded = EncodedBody::new(script(steps), Encoder::new(algorithm).unwrap());
            let collected = encoded.collect().await.unwrap();
            assert_eq!(collected.trailers(), Some(&trailers), "{algorithm:?}");
            let compressed = collected.to_bytes();
            assert!(compressed.len() < text.len() / 4, "{algorithm:?}");
            assert_eq!(decode(algorithm, &compressed), text, "{algorithm:?}");
        }
    }
}
