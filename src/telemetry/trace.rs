//! W3C Trace Context (`traceparent`): continue the client's trace, or start one, and tell the
//! upstream which span of the gateway its work belongs to.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// One request's place in a distributed trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span (absent when the gateway started the trace).
    pub parent_id: Option<[u8; 8]>,
    /// The gateway's server span: the request as the gateway handled it.
    pub server_span_id: [u8; 8],
    /// The gateway's client span around the upstream call: the upstream's parent.
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// Continues the trace in `headers` when its `traceparent` is valid and `trusted` (keeping
    /// the caller's sampling decision), else starts a new one, sampled with `sample_ratio`.
    pub fn from_request(headers: &HeaderMap, trusted: bool, sample_ratio: f64) -> Self {
        let continued = trusted
            .then(|| headers.get(TRACEPARENT))
            .flatten()
            .and_then(|value| parse_traceparent(value.as_bytes()));
        let server_span_id = random_nonzero::<8>();
        let span_id = random_nonzero::<8>();
        match continued {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                parent_id: Some(parent),
                server_span_id,
                span_id,
                sampled: flags & 1 == 1,
            },
            None => Self {
                trace_id: random_nonzero::<16>(),
                parent_id: None,
                server_span_id,
                span_id,
                sampled: sample_ratio >= 1.0 || fastrand::f64() < sample_ratio,
            },
        }
    }

    /// The trace id as 32 lowercase hex digits (for logs).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The trace id as hex in a stack buffer (the access log's, without an allocation).
    pub fn trace_id_buf(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        write_hex(&mut out, &self.trace_id);
        out
    }

    /// The `traceparent` the upstream receives: this trace, the gateway's span as parent.
    pub fn upstream_header(&self) -> HeaderValue {
        let mut value = [0u8; 55];
        value[..3].copy_from_slice(b"00-");
        write_hex(&mut value[3..35], &self.trace_id);
        value[35] = b'-';
        write_hex(&mut value[36..52], &self.span_id);
        value[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        HeaderValue::from_bytes(&value).expect("hex digits and dashes are a valid header value")
    }
}

/// Parses `version-traceid-parentid-flags` per the W3C spec: lowercase hex only, all-zero ids
/// invalid, version `ff` invalid; a future version may carry more fields after the flags.
pub fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() < 55 {
        return None;
    }
    let version = decode_hex::<1>(&value[0..2])?[0];
    if version == 0xff || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    if (version == 0 && value.len() != 55) || (version > 0 && value.len() > 55 && value[55] != b'-')
    {
        return None;
    }
    let trace_id = decode_hex::<16>(&value[3..35])?;
    let parent = decode_hex::<8>(&value[36..52])?;
    let flags = decode_hex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

fn decode_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None, // the spec allows lowercase only
        }
    }
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Random bytes, never all zero (an all-zero id is invalid in W3C trace context).
pub(crate) fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0u8; N];
        out.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if out != [0; N] {
            return out;
        }
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long); on the request path, so no `fmt`.
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    write_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let (trace, parent, flags) = parse_traceparent(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&parent), "00f067aa0ba902b7");
        assert_eq!(flags, 1);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", // v00 is exact
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // dash misplaced
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // a later version may add fields
        assert!(parse_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
    }

    #[test]
    fn continues_a_trusted_trace_with_a_new_span() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        let trace = TraceContext::from_request(&headers, true, 1.0);
        assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let upstream = trace.upstream_header();
        let (trace_id, parent, _) = parse_traceparent(upstream.as_bytes()).unwrap();
        assert_eq!(trace_id, trace.trace_id);
        assert_eq!(parent, trace.span_id);
        assert_ne!(hex(&parent), "00f067aa0ba902b7");
        // untrusted: a new trace
        let fresh = TraceContext::from_request(&headers, false, 1.0);
        assert_ne!(fresh.trace_id, trace.trace_id);
        assert!(fresh.parent_id.is_none());
    }
}
