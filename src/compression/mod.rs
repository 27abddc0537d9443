//! Response compression (gzip, brotli, zstd) by the client's `Accept-Encoding`: the decision
//! (here), the header parsing ([`accept`]) and the streaming encoders ([`encode`]).
//!
//! The decision has two halves. From the request head, before it is forwarded: which algorithm
//! the client takes (none for `HEAD` and `Range` requests). From the response head: whether this
//! response may be compressed at all. A response that could be compressed gets
//! `Vary: Accept-Encoding` whatever the client asked for, so a cache never hands the compressed
//! variant to a client that did not ask for it (nor the identity one to every client).

pub mod accept;
pub mod encode;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use crate::{
    config::{
        model::{CompressionAlgorithm as Algorithm, CompressionConfig},
        ErrorSink,
    },
    pipeline::ResponseBody,
};

/// Compression settings of a route or listener, compiled.
#[derive(Debug)]
pub struct CompressionPolicy {
    /// `false`: a route's way of turning its listener's compression off.
    enabled: bool,
    algorithms: Box<[Algorithm]>,
    min_size: u64,
    content_types: Box<[MediaRange]>,
}

impl CompressionPolicy {
    /// Compiles `config` (at `path`), reporting entries that cannot work.
    pub fn compile(config: &CompressionConfig, path: &str, sink: &mut ErrorSink<'_>) -> Self {
        let mut algorithms = Vec::with_capacity(config.algorithms.len());
        for algorithm in &config.algorithms {
            if algorithms.contains(algorithm) {
                sink.error(format!("{path}.algorithms"), "lists an algorithm twice");
            } else {
                algorithms.push(*algorithm);
            }
        }
        if config.enabled && algorithms.is_empty() {
            sink.error(
                format!("{path}.algorithms"),
                "names no algorithm (to turn compression off, say `enabled: false`)",
            );
        }
        let content_types = config
            .content_types
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let range = MediaRange::parse(text);
                if range.is_none() {
                    sink.error(
                        format!("{path}.content_types[{i}]"),
                        "expected `type/subtype`, `type/*` or `type/*+suffix`",
                    );
                }
                range
            })
            .collect();
        Self {
            enabled: config.enabled,
            algorithms: algorithms.into(),
            min_size: config.min_size.0,
            content_types,
        }
    }

    /// Whether a response with these head fields may be compressed (see the module docs).
    fn allows(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        if status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
            )
        {
            return false;
        }
        if headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
            || has_token(headers, header::CACHE_CONTROL, "no-transform")
        {
            return false;
        }
        let Some(content_type) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(MediaType::parse)
        else {
            // an unknown type could be anything, already compressed included
            return false;
        };
        // gRPC frames its own messages (and compresses them itself)
        if content_type.0.eq_ignore_ascii_case("application")
            && content_type.1.len() >= 4
            && content_type.1[..4].eq_ignore_ascii_case("grpc")
        {
            return false;
        }
        if !self.content_types.iter().any(|r| r.matches(content_type)) {
            return false;
        }
        match headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            Some(length) => length > 0 && length >= self.min_size,
            None => true,
        }
    }
}

/// What a request allows, decided from its head before it is forwarded.
#[derive(Debug)]
pub struct Negotiated<'p> {
    policy: &'p CompressionPolicy,
    /// `None`: the client takes none of the algorithms offered (identity it is).
    algorithm: Option<Algorithm>,
}

/// The compression that applies to a request: the route's settings, else the listener's; none
/// for `HEAD` (nothing to compress, and its head must not promise an encoding the GET may not
/// get) and `Range` requests (ranges address the identity bytes).
pub fn negotiate<'p>(
    route: Option<&'p CompressionPolicy>,
    listener: Option<&'p CompressionPolicy>,
    request: &http::request::Parts,
) -> Option<Negotiated<'p>> {
    let policy = route.or(listener).filter(|p| p.enabled)?;
    if request.method == Method::HEAD || request.headers.contains_key(header::RANGE) {
        return None;
    }
    let algorithm = accept::negotiate(
        request.headers.get_all(header::ACCEPT_ENCODING),
        &policy.algorithms,
    );
    Some(Negotiated { policy, algorithm })
}

impl Negotiated<'_> {
    /// Compresses `body` when the response allows it, adjusting `response`'s head: the
    /// `Content-Encoding`, `Vary: Accept-Encoding` added, no `Content-Length` (unknown until the
    /// end) nor `Accept-Ranges`, and a strong `ETag` weakened (the bytes differ from the
    /// identity representation's, the content does not).
    pub fn apply(&self, response: &mut http::response::Parts, body: ResponseBody) -> ResponseBody {
        if !self.policy.allows(response.status, &response.headers) {
            return body;
        }
        add_vary(&mut response.headers);
        let Some(algorithm) = self.algorithm else {
            return body;
        };
        let encoder = match encode::Encoder::new(algorithm) {
            Ok(encoder) => encoder,
            Err(error) => {
                tracing::debug!(%error, "response sent uncompressed");
                return body;
            }
        };
        let headers = &mut response.headers;
        headers.insert(header::CONTENT_ENCODING, coding(algorithm));
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT_RANGES);
        if let Some(weak) = headers.get(header::ETAG).and_then(weaken) {
            headers.insert(header::ETAG, weak);
        }
        body.encoded(encoder)
    }
}

/// The `Content-Encoding` token of an algorithm.
pub fn coding(algorithm: Algorithm) -> HeaderValue {
    HeaderValue::from_static(match algorithm {
        Algorithm::Zstd => "zstd",
        Algorithm::Br => "br",
        Algorithm::Gzip => "gzip",
    })
}

/// Appends `Accept-Encoding` to `Vary` unless it is there already (or `Vary: *` says it all).
fn add_vary(headers: &mut HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.eq_ignore_ascii_case("accept-encoding"));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// `W/` in front of a strong entity tag; `None` when it is weak already.
fn weaken(etag: &HeaderValue) -> Option<HeaderValue> {
    let bytes = etag.as_bytes();
    if bytes.starts_with(b"W/") {
        return None;
    }
    let mut weak = Vec::with_capacity(bytes.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(bytes);
    HeaderValue::from_bytes(&weak).ok()
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A response's `type/subtype`, parameters dropped.
#[derive(Debug, Clone, Copy)]
struct MediaType<'a>(&'a str, &'a str);

impl<'a> MediaType<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let essence = text.split(';').next()?.trim();
        let (kind, subtype) = essence.split_once('/')?;
        (!kind.is_empty() && !subtype.is_empty()).then_some(Self(kind, subtype))
    }
}

/// A configured content type: exact, a whole type (`text/*`), or a suffix (`application/*+json`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum MediaRange {
    Exact(Box<str>, Box<str>),
    AnySubtype(Box<str>),
    Suffix(Box<str>, Box<str>),
}

impl MediaRange {
    fn parse(text: &str) -> Option<Self> {
        let (kind, subtype) = text.trim().split_once('/')?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if !valid(kind) {
            return None;
        }
        let lower = |s: &str| s.to_ascii_lowercase().into_boxed_str();
        if subtype == "*" {
            return Some(Self::AnySubtype(lower(kind)));
        }
        if let Some(suffix) = subtype.strip_prefix("*+") {
            return valid(suffix).then(|| Self::Suffix(lower(kind), lower(suffix)));
        }
        valid(subtype).then(|| Self::Exact(lower(kind), lower(subtype)))
    }

    fn matches(&self, media: MediaType<'_>) -> bool {
        let MediaType(kind, subtype) = media;
        match self {
            Self::Exact(k, s) => kind.eq_ignore_ascii_case(k) && subtype.eq_ignore_ascii_case(s),
            Self::AnySubtype(k) => kind.eq_ignore_ascii_case(k),
            Self::Suffix(k, suffix) => {
                kind.eq_ignore_ascii_case(k)
                    && subtype.len() > suffix.len() + 1
                    && subtype.as_bytes()[subtype.len() - suffix.len() - 1] == b'+'
                    && subtype[subtype.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CompressionPolicy {
        CompressionPolicy {
            enabled: true,
            algorithms: [Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip].into(),
            min_size: 1024,
            content_types: CompressionConfig::default()
                .content_types
                .iter()
                .map(|t| MediaRange::parse(t).unwrap())
                .collect(),
        }
    }

    use crate::test_support::header_map as head;

    #[test]
    fn only_compressible_responses_are_allowed() {
        let p = policy();
        let ok = StatusCode::OK;
        assert!(p.allows(ok, &head(&[("content-type", "text/html; charset=utf-8")])));
        assert!(p.allows(ok, &head(&[("content-type", "application/problem+json")])));
        assert!(p.allows(
            StatusCode::NOT_FOUND,
            &head(&[
                ("content-type", "application/json"),
                ("content-length", "5000")
            ])
        ));
        for refused in [
            head(&[("content-type", "image/png")]),
            head(&[("content-type", "application/zip")]),
            head(&[("content-type", "video/mp4")]),
            head(&[]),
            head(&[("content-type", "application/grpc+json")]),
            head(&[("content-type", "text/plain"), ("content-encoding", "gzip")]),
            head(&[
                ("content-type", "text/plain"),
                ("cache-control", "public, No-Transform"),
            ]),
            head(&[("content-type", "text/plain"), ("content-length", "1023")]),
            head(&[("content-type", "text/plain"), ("content-length", "0")]),
            head(&[
                ("content-type", "text/plain"),
                ("content-range", "bytes 0-9/99"),
            ]),
        ] {
            assert!(!p.allows(ok, &refused), "{refused:?}");
        }
        let text = head(&[("content-type", "text/plain")]);
        for status in [101, 204, 206, 304] {
            assert!(
                !p.allows(StatusCode::from_u16(status).unwrap(), &text),
                "{status}"
            );
        }
    }

    #[test]
    fn media_ranges_parse_and_match() {
        let range = |t: &str| MediaRange::parse(t).unwrap();
        let media = |t: &'static str| MediaType::parse(t).unwrap();
        assert!(range("text/*").matches(media("Text/CSV")));
        assert!(range("application/*+json").matches(media("application/vnd.api+json")));
        assert!(!range("application/*+json").matches(media("application/json")));
        assert!(!range("application/*+json").matches(media("application/xjson")));
        assert!(range("application/json").matches(media("application/json;charset=utf-8")));
        for bad in ["text", "*/*", "text/", "/json", "text/**", "a b/c"] {
            assert!(MediaRange::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn vary_is_appended_once_and_etags_are_weakened() {
        let mut headers = head(&[("vary", "Origin")]);
        add_vary(&mut headers);
        add_vary(&mut headers);
        let vary: Vec<_> = headers.get_all("vary").iter().collect();
        assert_eq!(vary, ["Origin", "accept-encoding"]);
        let mut star = head(&[("vary", "*")]);
        add_vary(&mut star);
        assert_eq!(star.get_all("vary").iter().count(), 1);
        assert_eq!(
            weaken(&HeaderValue::from_static("\"abc\"")).unwrap(),
            "W/\"abc\""
        );
        assert!(weaken(&HeaderValue::from_static("W/\"abc\"")).is_none());
    }

    #[test]
    fn head_and_range_requests_are_never_compressed() {
        let p = policy();
        let request = |method: &str, extra: &[(&str, &str)]| {
            let mut builder = http::Request::builder()
                .method(method)
                .header("accept-encoding", "gzip");
            for (n, v) in extra {
                builder = builder.header(*n, *v);
            }
            builder.body(()).unwrap().into_parts().0
        };
        assert_eq!(
            negotiate(Some(&p), None, &request("GET", &[]))
                .unwrap()
                .algorithm,
            Some(Algorithm::Gzip)
        );
        assert!(negotiate(Some(&p), None, &request("HEAD", &[])).is_none());
        assert!(negotiate(Some(&p), None, &request("GET", &[("range", "bytes=0-9")])).is_none());
        // the route's settings replace the listener's, `enabled: false` included
        let off = CompressionPolicy {
            enabled: false,
            ..policy()
        };
        assert!(negotiate(Some(&off), Some(&p), &request("GET", &[])).is_none());
        assert!(negotiate(None, Some(&p), &request("GET", &[])).is_some());
    }
}
