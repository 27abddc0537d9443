//! `portcullis::compression::accept::{parse, negotiate}` on arbitrary bytes as an
//! `Accept-Encoding` value.
//!
//! Properties (RFC 9110 §12.5.3, as `src/compression/accept.rs` documents it):
//! - never panics;
//! - every parsed element has a non-empty coding made of token characters that appears in the
//!   input, and a weight of at most 1000 (q=1);
//! - the number of elements is at most the number of `,`-separated parts;
//! - `negotiate` agrees with a model built from `parse`: a coding's weight is that of the first
//!   element naming it (`x-gzip` is gzip, names compared without case), else the first `*`'s,
//!   else 0; the answer is the offered algorithm with the highest weight above 0, ties going to
//!   the earlier one offered; `None` when every offered weight is 0;
//! - for every order of the offer (all six), and for each single algorithm.

#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use portcullis::{
    compression::accept::{negotiate, parse, MAX_WEIGHT},
    config::model::CompressionAlgorithm as Algorithm,
};

const NAMES: [(Algorithm, &[&str]); 3] = [
    (Algorithm::Zstd, &["zstd"]),
    (Algorithm::Br, &["br"]),
    (Algorithm::Gzip, &["gzip", "x-gzip"]),
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed: Vec<_> = parse(text).collect();
    assert!(parsed.len() <= text.split(',').count());
    for preference in &parsed {
        assert!(!preference.coding.is_empty());
        assert!(text.contains(preference.coding));
        assert!(preference
            .coding
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)));
        assert!(preference.weight <= MAX_WEIGHT);
    }
    let Ok(value) = HeaderValue::from_str(text) else {
        return;
    };
    let weight = |algorithm: Algorithm| -> u16 {
        let names = NAMES.iter().find(|(a, _)| *a == algorithm).unwrap().1;
        parsed
            .iter()
            .find(|p| names.iter().any(|n| p.coding.eq_ignore_ascii_case(n)))
            .or_else(|| parsed.iter().find(|p| p.coding == "*"))
            .map_or(0, |p| p.weight)
    };
    let all = [Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut offers: Vec<Vec<Algorithm>> = orders
        .iter()
        .map(|o| o.iter().map(|&i| all[i]).collect())
        .collect();
    offers.extend(all.iter().map(|a| vec![*a]));
    for offered in offers {
        let mut expected: Option<(Algorithm, u16)> = None;
        for algorithm in &offered {
            let w = weight(*algorithm);
            if w > 0 && expected.is_none_or(|(_, best)| w > best) {
                expected = Some((*algorithm, w));
            }
        }
        assert_eq!(
            negotiate([&value], &offered),
            expected.map(|(a, _)| a),
            "{text:?} offered {offered:?}"
        );
    }
});
