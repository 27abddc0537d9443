//! A compiled rule: its limit, what makes up its key, which requests it counts, and the
//! `RateLimit-Policy` text it is announced with.

use std::{
    hash::{BuildHasher, Hasher},
    net::IpAddr,
    sync::Arc,
};

use http::{request, HeaderName, HeaderValue, Method};

use super::gcra::Limit;
use crate::{
    config::model::{RateLimitRuleConfig, RequestClass},
    pipeline::RequestCtx,
    policy::{authn::Identity, authz::MethodSet},
};

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    ClientIp,
    /// The client address truncated to a prefix.
    ClientNetwork {
        ipv4: u8,
        ipv6: u8,
    },
    Subject,
    /// The subject of an API-key identity (the key's id); other identities do not match.
    ApiKey,
    Route,
    Method,
    Class,
    Claim(Box<str>),
    Header(HeaderName),
}

impl KeyPart {
    fn parse(text: &str, network: (u8, u8)) -> Result<Self, String> {
        Ok(match text {
            "client_ip" => Self::ClientIp,
            "client_network" => Self::ClientNetwork {
                ipv4: network.0,
                ipv6: network.1,
            },
            "subject" => Self::Subject,
            "api_key" => Self::ApiKey,
            "route" => Self::Route,
            "method" => Self::Method,
            "class" => Self::Class,
            _ => match text.split_once(':') {
                Some(("claim", name)) if !name.is_empty() => Self::Claim(name.into()),
                Some(("header", name)) => Self::Header(
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("`{name}` is not a header name"))?,
                ),
                _ => {
                    return Err(format!(
                        "`{text}` is not a key part: client_ip, client_network, subject, api_key, route, method, class, claim:NAME or header:NAME"
                    ))
                }
            },
        })
    }

    /// Needs a verified identity (so the rule runs after authentication).
    pub fn needs_identity(&self) -> bool {
        matches!(self, Self::Subject | Self::ApiKey | Self::Claim(_))
    }
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub limit: Limit,
    pub key: Box<[KeyPart]>,
    pub class: Option<RequestClass>,
    pub methods: MethodSet,
    pub shadow: bool,
    pub global: bool,
    /// `"name";q=COUNT;w=SECONDS` (the rate), an item of `RateLimit-Policy`.
    pub policy_header: HeaderValue,
    /// The window announced (`w`): the rate's period, in seconds.
    pub window_secs: u64,
}

/// What a key is read from.
pub struct KeySource<'a> {
    pub ctx: &'a RequestCtx,
    pub request: &'a request::Parts,
    pub identity: Option<&'a Identity>,
}

impl Rule {
    /// Compiles a rule; the error names the field.
    pub fn compile(config: &RateLimitRuleConfig) -> Result<Self, (&'static str, String)> {
        let (count, period) = parse_rate(&config.rate).map_err(|m| ("rate", m))?;
        let burst = config.burst.unwrap_or(count);
        if burst == 0 {
            return Err(("burst", "must be at least 1".into()));
        }
        let network = (config.network.ipv4, config.network.ipv6);
        if network.0 > 32 || network.1 > 128 {
            return Err((
                "network",
                "prefix lengths are at most 32 (IPv4) and 128 (IPv6)".into(),
            ));
        }
        let key = config
            .key
            .iter()
            .map(|part| KeyPart::parse(part, network))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| ("key", m))?;
        let methods = if config.methods.is_empty() {
            MethodSet::ALL
        } else {
            MethodSet::parse(config.methods.iter().map(String::as_str))
                .map_err(|m| ("methods", m))?
        };
        let limit = Limit::new(count, period, burst);
        let window_secs = (limit.interval.saturating_mul(u64::from(burst)))
            .div_ceil(1_000_000_000)
            .max(1);
        let policy_header =
            HeaderValue::from_str(&format!("\"{}\";q={burst};w={window_secs}", config.name))
                .map_err(|_| {
                    (
                        "name",
                        "must be printable ASCII (it names the policy in headers)".into(),
                    )
                })?;
        Ok(Self {
            name: config.name.as_str().into(),
            limit,
            key: key.into(),
            class: config.class,
            methods,
            shadow: config.shadow,
            global: config.global,
            policy_header,
            window_secs,
        })
    }

    /// Counts per client (address, network or identity): a refusal by such a rule says
    /// something about the client, unlike one by a shared budget (a route's).
    pub fn keys_client(&self) -> bool {
        self.key.iter().any(|part| {
            matches!(
                part,
                KeyPart::ClientIp
                    | KeyPart::ClientNetwork { .. }
                    | KeyPart::Subject
                    | KeyPart::ApiKey
            )
        })
    }

    /// Runs after authentication (its key needs the identity).
    pub fn needs_identity(&self) -> bool {
        self.key.iter().any(KeyPart::needs_identity)
    }

    /// Whether the rule counts this request.
    pub fn applies(&self, method: &Method) -> bool {
        self.methods.contains(method) && self.class.is_none_or(|class| class == class_of(method))
    }

    /// The request's key under this rule, or `None` when a part has no value for it (no identity,
    /// a missing header or claim): the rule then does not count the request.
    pub fn key(&self, hasher: &impl BuildHasher, source: &KeySource<'_>) -> Option<u64> {
        let mut state = hasher.build_hasher();
        self.write_key(&mut state, source)?;
        Some(state.finish())
    }

    /// The key as every replica computes it alike (128 bits of a SHA-256 of the same parts),
    /// for a shared store.
    pub fn shared_digest(&self, source: &KeySource<'_>) -> Option<[u8; 16]> {
        let mut state = Sha256Writer(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256));
        self.write_key(&mut state, source)?;
        let digest = state.0.finish();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest.as_ref()[..16]);
        Some(out)
    }

    /// [`shared_digest`](Self::shared_digest) as a Redis key name (before the prefix).
    pub fn shared_key(&self, source: &KeySource<'_>) -> Option<String> {
        self.shared_digest(source)
            .map(|digest| shared_name(&digest))
    }

    /// Writes the key's parts as length-prefixed bytes (an explicit encoding, the same on every
    /// platform and build: the shared store's key names depend on it).
    fn write_key(&self, state: &mut impl Hasher, source: &KeySource<'_>) -> Option<()> {
        let mut part = |bytes: &[u8]| {
            state.write(&(bytes.len() as u64).to_le_bytes());
            state.write(bytes);
        };
        part(self.name.as_bytes());
        for key_part in self.key.iter() {
            match key_part {
                KeyPart::ClientIp => part(&ip_bytes(source.ctx.client_ip)),
                KeyPart::ClientNetwork { ipv4, ipv6 } => {
                    part(&ip_bytes(network(source.ctx.client_ip, *ipv4, *ipv6)))
                }
                KeyPart::Subject => {
                    let identity = source.identity?;
                    part(identity.provider.as_bytes());
                    part(identity.subject.as_bytes());
                }
                KeyPart::ApiKey => {
                    let identity = source.identity.filter(|i| i.method == "api_key")?;
                    part(identity.provider.as_bytes());
                    part(identity.subject.as_bytes());
                }
                KeyPart::Route => part(source.ctx.route.as_deref().unwrap_or_default().as_bytes()),
                KeyPart::Method => part(source.request.method.as_str().as_bytes()),
                KeyPart::Class => part(match class_of(&source.request.method) {
                    RequestClass::Read => b"read",
                    RequestClass::Write => b"write",
                }),
                KeyPart::Claim(name) => {
                    let value = source.identity?.claim(name)?;
                    match &*value {
                        serde_json::Value::String(text) => part(text.as_bytes()),
                        other => part(other.to_string().as_bytes()),
                    }
                }
                KeyPart::Header(name) => part(source.request.headers.get(name)?.as_bytes()),
            }
        }
        Some(())
    }
}

/// Feeds what `Hash` writes into SHA-256 (stable across processes and builds, unlike the
/// standard hasher).
struct Sha256Writer(aws_lc_rs::digest::Context);

impl Hasher for Sha256Writer {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        0 // only the digest is used
    }
}

/// An address as 16 bytes (IPv4 as its IPv6-mapped form, so both spellings are one key).
fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `rl:` and the digest in hex.
pub fn shared_name(digest: &[u8; 16]) -> String {
    let mut name = String::with_capacity(3 + 32);
    name.push_str("rl:");
    for byte in digest {
        let _ = std::fmt::Write::write_fmt(&mut name, format_args!("{byte:02x}"));
    }
    name
}

/// Read: GET, HEAD, OPTIONS; write: everything else.
pub fn class_of(method: &Method) -> RequestClass {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        RequestClass::Read
    } else {
        RequestClass::Write
    }
}

/// The address with only its first `ipv4`/`ipv6` bits.
pub fn network(ip: IpAddr, ipv4: u8, ipv6: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(ipv4)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(ipv6)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// `100/s`, `600/min`, `5000/h`, `100000/d` → (count, period in nanoseconds).
pub fn parse_rate(text: &str) -> Result<(u32, u64), String> {
    let bad = || format!("`{text}` is not a rate such as 100/s, 600/min, 5000/h or 100000/d");
    let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err("a rate of 0 refuses everything: remove the route instead".into());
    }
    let second = 1_000_000_000u64;
    let period = match unit.trim() {
        "s" | "sec" | "second" => second,
        "m" | "min" | "minute" => 60 * second,
        "h" | "hour" => 3_600 * second,
        "d" | "day" => 86_400 * second,
        _ => return Err(bad()),
    };
    Ok((count, period))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_networks() {
        assert_eq!(parse_rate("100/s"), Ok((100, 1_000_000_000)));
        assert_eq!(parse_rate("5000/h"), Ok((5000, 3_600_000_000_000)));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/fortnight").is_err());
        assert!(parse_rate("ten/s").is_err());
        assert_eq!(
            network("203.0.113.77".parse().unwrap(), 24, 56),
            "203.0.113.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            network("2001:db8:1:2:3::9".parse().unwrap(), 24, 48),
            "2001:db8:1::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            network("10.1.2.3".parse().unwrap(), 0, 0),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
    }
}
