//! Header hygiene between client and upstream: hop-by-hop headers (RFC 9110 §7.6.1), the
//! `X-Forwarded-*` / `Forwarded` family, and the request id. Forwarding headers are believed only
//! from configured trusted proxies; from anyone else they are replaced, so a client cannot forge
//! its address or request id.

use std::{fmt::Write, net::IpAddr};

use http::{header, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::pipeline::{
    FORWARDED, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID,
};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers, including every header the `Connection` header names.
/// `keep_te_trailers`: keep `TE: trailers` (gRPC needs it end to end over HTTP/2).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // one pass of cheap name comparisons finds which are present; only those are removed
    // (most requests carry none; most upstream responses only `Connection: keep-alive`)
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(bit) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << bit;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // HOP_BY_HOP[0] is `Connection`: it also names headers to drop
        let mut named = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            if let Ok(text) = value.to_str() {
                for token in text.split(',') {
                    let token = token.trim();
                    // `close` and `keep-alive` are options, not header names worth a lookup
                    if token.eq_ignore_ascii_case("close")
                        || token.eq_ignore_ascii_case("keep-alive")
                    {
                        continue;
                    }
                    if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                        named.push(name);
                    }
                }
            }
        }
        headers.remove(header::CONNECTION);
        for name in named {
            // never let `Connection` remove what the gateway itself sets
            if name != X_REQUEST_ID && name != header::HOST {
                headers.remove(name);
            }
        }
    }
    for (bit, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << bit) == 0 {
            continue;
        }
        if *name == header::TE {
            let trailers_only = keep_te_trailers
                && headers
                    .get_all(header::TE)
                    .iter()
                    .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            if trailers_only {
                continue;
            }
        }
        headers.remove(name);
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// non-standard `Keep-Alive`/`Proxy-Connection` and the proxy's own `Proxy-Authorization`).
/// `Connection` must stay first.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
    header::TE,
];

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address: the peer, or (through trusted proxies) the right-most untrusted address
/// in `X-Forwarded-For`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    // an IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d: it is an IPv4 client
    // (for trusted proxies, limits by network, scores and the log)
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    let entries: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.iter().rev() {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                client = ip;
                if !is_trusted(ip, trusted) {
                    break;
                }
            }
            // garbage in the chain: stop believing it
            Err(_) => break,
        }
    }
    client
}

/// The direct peer's address, formatted once per connection for the forwarding headers.
#[derive(Debug, Clone)]
pub struct PeerAddress {
    /// `X-Forwarded-For` value naming only this peer.
    xff: HeaderValue,
    /// The `for=` parameter of `Forwarded` (RFC 7239 quotes and brackets IPv6).
    forwarded_for: Box<str>,
}

impl PeerAddress {
    pub fn new(ip: IpAddr) -> Self {
        let forwarded_for = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        Self {
            xff: HeaderValue::from_str(&ip.to_string())
                .expect("an IP address is a valid header value"),
            forwarded_for: forwarded_for.into(),
        }
    }
}

/// What the upstream is told about the original request.
pub struct ForwardedFor<'a> {
    pub peer: &'a PeerAddress,
    pub trusted_peer: bool,
    pub tls: bool,
    /// The `Host` the client asked for (authority or header).
    pub host: Option<&'a HeaderValue>,
}

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded`: appended to
/// from trusted proxies, replaced otherwise.
pub fn set_forwarding_headers(headers: &mut HeaderMap, info: &ForwardedFor<'_>) {
    let proto = if info.tls { "https" } else { "http" };

    // X-Forwarded-For: from an untrusted peer, just the peer (pre-formatted, no allocation)
    let xff = if info.trusted_peer {
        append_to_list(
            headers,
            X_FORWARDED_FOR,
            info.peer.xff.to_str().unwrap_or_default(),
        )
    } else {
        Some(info.peer.xff.clone())
    };
    if let Some(value) = xff {
        headers.insert(X_FORWARDED_FOR, value);
    }

    if !(info.trusted_peer && headers.contains_key(X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(info.trusted_peer && headers.contains_key(X_FORWARDED_HOST)) {
        match info.host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }

    // Forwarded (RFC 7239)
    let host = info.host.and_then(|h| h.to_str().ok()).filter(|host| {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    });
    let mut element =
        String::with_capacity(info.peer.forwarded_for.len() + 20 + host.map_or(0, str::len));
    element.push_str(&info.peer.forwarded_for);
    element.push_str(";proto=");
    element.push_str(proto);
    if let Some(host) = host {
        let _ = write!(element, ";host=\"{host}\"");
    }
    let forwarded = if info.trusted_peer {
        append_to_list(headers, FORWARDED, &element)
    } else {
        HeaderValue::from_maybe_shared(bytes::Bytes::from(element)).ok()
    };
    if let Some(value) = forwarded {
        headers.insert(FORWARDED, value);
    }
}

/// `existing values, item` for list headers extended by a proxy.
fn append_to_list(headers: &HeaderMap, name: HeaderName, item: &str) -> Option<HeaderValue> {
    let mut joined = String::new();
    for value in headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        joined.push_str(value);
        joined.push_str(", ");
    }
    joined.push_str(item);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)).ok()
}

/// The request id: a trusted proxy's (if well-formed), otherwise a fresh random one.
pub fn request_id(headers: &HeaderMap, trusted_peer: bool) -> HeaderValue {
    if trusted_peer {
        if let Some(value) = headers.get(X_REQUEST_ID) {
            let bytes = value.as_bytes();
            if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
            {
                return value.clone();
            }
        }
    }
    new_request_id()
}

/// 128 random bits as 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = fastrand::u128(..);
    let mut out = [0u8; 32];
    for byte in out.iter_mut().rev() {
        *byte = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_clients_of_dual_stack_listeners_are_ipv4_clients() {
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        let plain: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(mapped, &HeaderMap::new(), &[]), plain);
        // and a trusted proxy's forwarded address likewise
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, "::ffff:198.51.100.1".parse().unwrap());
        let proxy: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &headers, &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn connection_named_and_standard_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-keep"));

        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut grpc, true);
        assert!(grpc.contains_key(header::TE));
        strip_hop_by_hop(&mut grpc, false);
        assert!(!grpc.contains_key(header::TE));
    }

    #[test]
    fn forwarded_headers_from_untrusted_clients_are_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(peer, &headers, &[]), peer);
        let host = HeaderValue::from_static("api.example.com");
        set_forwarding_headers(
            &mut headers,
            &ForwardedFor {
                peer: &PeerAddress::new(peer),
                trusted_peer: false,
                tls: false,
                host: Some(&host),
            },
        );
        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.9");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "api.example.com");
        assert_eq!(
            headers[FORWARDED],
            "for=203.0.113.9;proto=http;host=\"api.example.com\""
        );
    }

    #[test]
    fn trusted_proxies_extend_the_chain_and_name_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut headers = HeaderMap::new();
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 198.51.100.7, 10.1.1.1"),
        );
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        // the right-most untrusted entry is the client; what it claims before it is not believed
        assert_eq!(
            client_ip(peer, &headers, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        set_forwarding_headers(
            &mut headers,
            &ForwardedFor {
                peer: &PeerAddress::new(peer),
                trusted_peer: true,
                tls: true,
                host: None,
            },
        );
        assert_eq!(
            headers[X_FORWARDED_FOR],
            "6.6.6.6, 198.51.100.7, 10.1.1.1, 10.0.0.2"
        );
    }

    #[test]
    fn request_ids_are_kept_only_from_trusted_proxies() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("upstream-id-1"));
        assert_eq!(request_id(&headers, true), "upstream-id-1");
        let fresh = request_id(&headers, false);
        assert_ne!(fresh, "upstream-id-1");
        assert_eq!(fresh.len(), 32);
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers, true), "has space");
    }
}
