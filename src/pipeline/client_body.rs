//! The client's request body, whichever protocol carried it, as one type the request path takes.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;

use super::BoxError;

/// A request body as the client sends it: hyper's for HTTP/1.1 and HTTP/2, a boxed stream for
/// HTTP/3. An enum rather than one boxed type so the common hyper path pays no allocation or
/// dynamic dispatch.
pub enum ClientBody {
    Hyper(Incoming),
    /// A body from another transport (HTTP/3), boxed: only `Send`, as QUIC streams are not `Sync`.
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl ClientBody {
    pub fn boxed<B>(body: B) -> Self
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        Self::Boxed(UnsyncBoxBody::new(body))
    }
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> Self {
        Self::Hyper(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(body) => body.size_hint(),
            Self::Boxed(body) => body.size_hint(),
        }
    }
}
