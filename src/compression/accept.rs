//! `Accept-Encoding` (RFC 9110 §12.5.3): which content codings a client takes, and how much it
//! prefers each.
//!
//! Lenient where it is harmless, strict where a mistake would send a client something it refused:
//! an element with a malformed weight is ignored rather than guessed at, and `q=0` always means
//! "not this one", also through `*`.

use http::HeaderValue;

use crate::config::model::CompressionAlgorithm as Algorithm;

/// The largest weight (`q=1`), in thousandths.
pub const MAX_WEIGHT: u16 = 1000;

/// One element of the header: a content coding (or `*`) and its weight in thousandths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preference<'a> {
    pub coding: &'a str,
    pub weight: u16,
}

/// The elements of one header value, in order. Empty elements are skipped, and so are elements
/// whose coding is not a token or whose `q` is not a valid weight.
pub fn parse(value: &str) -> impl Iterator<Item = Preference<'_>> {
    value.split(',').filter_map(parse_element)
}

fn parse_element(element: &str) -> Option<Preference<'_>> {
    let mut parts = element.split(';');
    let coding = parts.next()?.trim();
    if coding.is_empty() || !coding.bytes().all(is_token_byte) {
        return None;
    }
    let mut weight = MAX_WEIGHT;
    for parameter in parts {
        let (name, value) = parameter.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("q") {
            weight = parse_weight(value.trim())?;
        }
    }
    Some(Preference { coding, weight })
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn parse_weight(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths = 0u16;
    for (i, digit) in fraction.bytes().enumerate() {
        thousandths += u16::from(digit - b'0') * [100, 10, 1][i];
    }
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(MAX_WEIGHT),
        _ => None,
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The algorithm a coding names (`x-gzip` is gzip, RFC 9110 §8.4.1.3).
fn algorithm(coding: &str) -> Option<Algorithm> {
    [
        ("zstd", Algorithm::Zstd),
        ("br", Algorithm::Br),
        ("gzip", Algorithm::Gzip),
        ("x-gzip", Algorithm::Gzip),
    ]
    .into_iter()
    .find(|(name, _)| coding.eq_ignore_ascii_case(name))
    .map(|(_, algorithm)| algorithm)
}

/// The algorithm to answer with, among `offered` (in the gateway's order of preference), given
/// the request's `Accept-Encoding` values: the one with the highest weight above 0, ties going to
/// the earlier in `offered`. A coding the client does not name takes the weight of `*`, or is not
/// acceptable. `None`: no header, or nothing offered is acceptable (the response stays identity).
///
/// The first element naming a coding decides its weight. Bytes that are not UTF-8 spoil only the
/// elements they are in (found by fuzzing: a value was ignored whole for one non-ASCII element).
pub fn negotiate<'h>(
    values: impl IntoIterator<Item = &'h HeaderValue>,
    offered: &[Algorithm],
) -> Option<Algorithm> {
    // weights by position in `offered`, and of `*`
    let mut weights = [None::<u16>; 3];
    let mut any = None::<u16>;
    for value in values {
        // obs-text is allowed in header values; it cannot be part of a coding name anyway
        let text = String::from_utf8_lossy(value.as_bytes());
        for preference in parse(&text) {
            if preference.coding == "*" {
                any.get_or_insert(preference.weight);
            } else if let Some(algorithm) = algorithm(preference.coding) {
                if let Some(i) = offered.iter().position(|a| *a == algorithm) {
                    if let Some(slot) = weights.get_mut(i) {
                        slot.get_or_insert(preference.weight);
                    }
                }
            }
        }
    }
    let mut best: Option<(Algorithm, u16)> = None;
    for (i, algorithm) in offered.iter().enumerate() {
        let weight = weights
            .get(i)
            .copied()
            .flatten()
            .or(any)
            .unwrap_or_default();
        if weight > 0 && best.is_none_or(|(_, w)| weight > w) {
            best = Some((*algorithm, weight));
        }
    }
    best.map(|(algorithm, _)| algorithm)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Algorithm; 3] = [Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip];

    fn pick(header: &str, offered: &[Algorithm]) -> Option<Algorithm> {
        negotiate([&HeaderValue::from_str(header).unwrap()], offered)
    }

    #[test]
    fn elements_parse_with_their_weights() {
        let parsed: Vec<_> =
            parse("gzip, br;q=0.8 , zstd;Q=0.125,identity;q=0, *;q=1.000").collect();
        assert_eq!(
            parsed,
            [
                Preference {
                    coding: "gzip",
                    weight: 1000
                },
                Preference {
                    coding: "br",
                    weight: 800
                },
                Preference {
                    coding: "zstd",
                    weight: 125
                },
                Preference {
                    coding: "identity",
                    weight: 0
                },
                Preference {
                    coding: "*",
                    weight: 1000
                },
            ]
        );
    }

    #[test]
    fn malformed_elements_are_skipped() {
        for bad in [
            "gzip;q=1.5",
            "gzip;q=2",
            "gzip;q=0.1234",
            "gzip;q=",
            "gzip;q=abc",
            "gzip;q=-0",
            "gzip;q",
            "gz ip",
            "\"gzip\"",
            "",
            " , ,",
        ] {
            assert_eq!(parse(bad).count(), 0, "{bad:?}");
        }
        // the good elements around a bad one stay
        let parsed: Vec<_> = parse("br;q=9, gzip;q=0.5").collect();
        assert_eq!(
            parsed,
            [Preference {
                coding: "gzip",
                weight: 500
            }]
        );
    }

    #[test]
    fn the_highest_weight_wins_and_ties_go_to_the_gateways_order() {
        assert_eq!(pick("gzip;q=0.5, br;q=1", &ALL), Some(Algorithm::Br));
        assert_eq!(pick("gzip, br", &ALL), Some(Algorithm::Br));
        assert_eq!(pick("gzip, br, zstd", &ALL), Some(Algorithm::Zstd));
        assert_eq!(
            pick("gzip, br, zstd", &[Algorithm::Gzip, Algorithm::Br]),
            Some(Algorithm::Gzip)
        );
        assert_eq!(pick("zstd;q=0.2, gzip;q=0.9", &ALL), Some(Algorithm::Gzip));
        assert_eq!(pick("GZIP", &ALL), Some(Algorithm::Gzip));
        assert_eq!(pick("x-gzip", &ALL), Some(Algorithm::Gzip));
    }

    #[test]
    fn zero_weights_and_identity_refuse() {
        assert_eq!(pick("gzip;q=0", &ALL), None);
        assert_eq!(pick("gzip;q=0, br;q=0.001", &ALL), Some(Algorithm::Br));
        assert_eq!(pick("identity", &ALL), None);
        assert_eq!(pick("", &ALL), None);
        assert_eq!(pick("deflate, compress", &ALL), None);
        // `*` covers what is not named, never what is refused by name
        assert_eq!(pick("*", &ALL), Some(Algorithm::Zstd));
        assert_eq!(pick("zstd;q=0, *", &ALL), Some(Algorithm::Br));
        assert_eq!(pick("*;q=0, gzip", &ALL), Some(Algorithm::Gzip));
        assert_eq!(pick("*;q=0", &ALL), None);
        // the first element naming a coding decides
        assert_eq!(pick("gzip;q=0, gzip", &[Algorithm::Gzip]), None);
    }

    #[test]
    fn several_header_lines_are_one_list_and_no_header_is_no_compression() {
        let lines = [
            HeaderValue::from_static("gzip;q=0.3"),
            HeaderValue::from_static("br;q=0.7"),
        ];
        assert_eq!(negotiate(&lines, &ALL), Some(Algorithm::Br));
        assert_eq!(negotiate([], &ALL), None);
        let opaque = HeaderValue::from_bytes(b"gzip\xff").unwrap();
        assert_eq!(negotiate([&opaque], &ALL), None);
        // fuzzing finding F11: one element with non-ASCII text does not spoil the others
        let mixed = HeaderValue::from_str("gzip;q=0.5, br\u{14a}=1").unwrap();
        assert_eq!(negotiate([&mixed], &ALL), Some(Algorithm::Gzip));
        let raw = HeaderValue::from_bytes(b"br;q=0.2, \xffzstd, gzip;q=0.1").unwrap();
        assert_eq!(negotiate([&raw], &ALL), Some(Algorithm::Br));
    }
}
