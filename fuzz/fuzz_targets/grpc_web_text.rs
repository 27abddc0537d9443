//! `portcullis::proxy::decode_grpc_web_text`, the decoder of `application/grpc-web-text` request
//! bodies (base64, possibly several independently padded chunks one after another, as a client
//! that encodes each message on its own sends them).
//!
//! Input: the whole input is first decoded as it is. Then the first byte chooses the framing
//! (bits 0–2: how many split points follow, bits 3–4: line breaks, bits 5–7: their spacing), the
//! next bytes are split points and the rest is the payload `b`.
//! Properties:
//! - never panics;
//! - an input with a byte outside the standard base64 alphabet (`A–Z a–z 0–9 + /`), ASCII
//!   whitespace and `=` decodes to `None`;
//! - `b` encoded with the standard alphabet and padding, as one chunk or as several chunks split
//!   at the chosen points (each padded on its own, empty ones included), with CR LF, LF or CR
//!   inserted every few characters (padding included) or around the whole, decodes back to
//!   exactly `b`. The encoder is written here, independently of the `base64` crate.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::decode_grpc_web_text;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fuzz_target!(|data: &[u8]| {
    let direct = decode_grpc_web_text(data);
    let foreign = data
        .iter()
        .any(|b| !(ALPHABET.contains(b) || b.is_ascii_whitespace() || *b == b'='));
    if foreign {
        assert!(
            direct.is_none(),
            "accepted a byte outside base64: {direct:?}"
        );
    }

    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let splits = usize::from(control & 0b111).min(rest.len());
    let (points, payload) = rest.split_at(splits);
    let mut cuts: Vec<usize> = points
        .iter()
        .map(|&p| usize::from(p) % (payload.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut encoded = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([payload.len()]) {
        encode(&payload[start..cut], &mut encoded);
        start = cut;
    }
    let every = usize::from(control >> 5) + 1;
    let text = match (control >> 3) & 0b11 {
        0 => encoded,
        mode => {
            let brk: &[u8] = match mode {
                1 => b"\r\n",
                2 => b"\n",
                _ => b"\r",
            };
            let mut text = brk.to_vec();
            for (i, &b) in encoded.iter().enumerate() {
                if i > 0 && i % every == 0 {
                    text.extend_from_slice(brk);
                }
                text.push(b);
            }
            text.extend_from_slice(brk);
            text
        }
    };
    let decoded = decode_grpc_web_text(&text);
    assert_eq!(
        decoded.as_deref(),
        Some(payload),
        "{:?} does not decode back",
        String::from_utf8_lossy(&text)
    );
});

/// Standard base64 with `=` padding.
fn encode(bytes: &[u8], out: &mut Vec<u8>) {
    for group in bytes.chunks(3) {
        let n = (u32::from(group[0]) << 16)
            | (u32::from(*group.get(1).unwrap_or(&0)) << 8)
            | u32::from(*group.get(2).unwrap_or(&0));
        let sextet = |i: u32| ALPHABET[((n >> (18 - 6 * i)) & 63) as usize];
        out.push(sextet(0));
        out.push(sextet(1));
        out.push(if group.len() > 1 { sextet(2) } else { b'=' });
        out.push(if group.len() > 2 { sextet(3) } else { b'=' });
    }
}
