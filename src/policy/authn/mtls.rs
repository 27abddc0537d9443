//! Authentication by TLS client certificate. The listener verified the certificate chain
//! against its client CA during the handshake; this method maps the verified certificate to an
//! identity (URI SAN such as a SPIFFE ID, DNS SAN, or common name) and checks it against an
//! allow-list. The certificate's SHA-256 also binds tokens to it (RFC 8705 `cnf.x5t#S256`).

use std::sync::Arc;

use base64::Engine as _;
use http::request;
use rustls_pki_types::CertificateDer;

use super::{sha256, AuthFailure, Identity, IdentityHeaderNames};
use crate::config::model::{CertificateIdentity, MtlsConfig};

/// The verified client certificate of a connection, parsed once per connection.
#[derive(Debug)]
pub struct ClientCertificate {
    /// base64url SHA-256 of the DER certificate (the `x5t#S256` thumbprint).
    pub thumbprint: String,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub common_name: Option<String>,
}

impl ClientCertificate {
    /// Parses the leaf certificate a TLS handshake verified.
    pub fn from_der(der: &CertificateDer<'_>) -> Option<Self> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        Some(Self {
            thumbprint: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha256(der.as_ref())),
            uri_sans: cert.valid_uri_names().map(str::to_owned).collect(),
            dns_sans: cert.valid_dns_names().map(str::to_owned).collect(),
            common_name: common_name(cert.subject()),
        })
    }
}

/// The common name of a DER-encoded Name, read by walking its structure (RDN sets of
/// type-and-value pairs), so text inside another attribute can never pass for a common name.
fn common_name(subject: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    // webpki hands over the Name's contents (the RDN sets), without the outer SEQUENCE
    let mut rdns = subject;
    if let Some((0x30, inner, _)) = tlv(rdns) {
        rdns = inner;
    }
    while let Some((tag, set, rest)) = tlv(rdns) {
        rdns = rest;
        if tag != 0x31 {
            return None;
        }
        let mut attributes = set;
        while let Some((0x30, attribute, more)) = tlv(attributes) {
            attributes = more;
            let (0x06, oid, value) = tlv(attribute)? else {
                return None;
            };
            let (string_tag, text, _) = tlv(value)?;
            if oid == CN && matches!(string_tag, 0x0c | 0x13 | 0x16) {
                return std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// One DER TLV: (tag, contents, rest). Short and long definite lengths up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | b as usize);
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A compiled mTLS method.
#[derive(Debug)]
pub struct MtlsMethod {
    pub name: Arc<str>,
    identity_from: CertificateIdentity,
    allow: Vec<String>,
    roles: std::collections::BTreeMap<String, Vec<String>>,
    identity_names: Arc<IdentityHeaderNames>,
}

impl MtlsMethod {
    pub fn from_config(config: &MtlsConfig, identity_names: Arc<IdentityHeaderNames>) -> Self {
        Self {
            name: config.name.as_str().into(),
            identity_from: config.identity_from,
            allow: config.allow.clone(),
            roles: config.roles.clone(),
            identity_names,
        }
    }

    pub fn authenticate(&self, request: &request::Parts) -> Result<Arc<Identity>, AuthFailure> {
        let certificate = request
            .extensions
            .get::<Arc<ClientCertificate>>()
            .ok_or(AuthFailure::Missing)?;
        let subject = match self.identity_from {
            CertificateIdentity::UriSan => certificate.uri_sans.first(),
            CertificateIdentity::DnsSan => certificate.dns_sans.first(),
            CertificateIdentity::CommonName => certificate.common_name.as_ref(),
        }
        .ok_or(AuthFailure::Invalid("certificate has no usable identity"))?;
        let allowed = self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => subject.starts_with(prefix),
                    None => pattern == subject,
                });
        if !allowed {
            return Err(AuthFailure::Invalid("certificate identity not allowed"));
        }
        let roles: Vec<Box<str>> = self
            .roles
            .get(subject)
            .map(|roles| roles.iter().map(|r| r.as_str().into()).collect())
            .unwrap_or_default();
        let headers =
            self.identity_names
                .headers_for("mtls", &self.name, subject, None, &roles, Vec::new());
        Ok(Arc::new(Identity {
            method: "mtls",
            provider: self.name.clone(),
            subject: subject.as_str().into(),
            issuer: None,
            roles,
            scopes: Vec::new(),
            claims: Vec::new(),
            headers,
            token_id: None,
            certificate_thumbprint: None,
            dpop_key: None,
            expires_at: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::common_name;

    #[test]
    fn common_names_are_read_from_the_subject() {
        // SEQUENCE { SET { SEQUENCE { OID 2.5.4.3, UTF8String "svc-a" } } }
        let subject = [
            0x30, 0x10, 0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b's',
            b'v', b'c', b'-', b'a',
        ];
        assert_eq!(common_name(&subject).as_deref(), Some("svc-a"));
        assert_eq!(
            common_name(&subject[2..]).as_deref(),
            Some("svc-a"),
            "without the outer SEQUENCE"
        );
        assert_eq!(common_name(&[0x30, 0x00]), None);
        // an organisation whose value merely contains the CN OID bytes is not a common name
        let spoof = [
            0x31, 0x11, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x08, 0x06, 0x03, 0x55,
            0x04, 0x03, 0x0c, 0x01, b'x',
        ];
        assert_eq!(common_name(&spoof), None);
    }
}
