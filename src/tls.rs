//! TLS configuration with rustls (aws-lc-rs provider) for both sides: listeners (PEM certificates,
//! SNI selection, TLS 1.2/1.3 only) and upstream connections (server verification, optional client
//! certificate).

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::route::HostPattern;

/// Why TLS material could not be loaded; shown as a config error on the field that named it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("`{path}` holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("`{path}` is not a PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("`{path}` holds no usable CA certificate")]
    NoCa { path: PathBuf },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::BadKey {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// A certificate and key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::BadKey {
            path: cert.to_owned(),
            reason: error.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|error| TlsError::BadKey {
        path: cert.to_owned(),
        reason: format!("key does not match the certificate ({error})"),
    })?;
    Ok(Arc::new(certified))
}

/// Chooses a certificate by SNI: exact names, then wildcards, then the default (the first).
#[derive(Debug)]
pub struct SniResolver {
    by_name: Vec<(HostPattern, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    pub fn new(
        default: Arc<CertifiedKey>,
        mut by_name: Vec<(HostPattern, Arc<CertifiedKey>)>,
    ) -> Self {
        by_name.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.rank()));
        Self { by_name, default }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.by_name
                .iter()
                .find(|(pattern, _)| pattern.matches(&name))
                .map(|(_, key)| key.clone())
        });
        Some(chosen.unwrap_or_else(|| self.default.clone()))
    }
}

/// Client certificates a listener asks for: verified against `ca`, and `required` or optional.
pub struct ClientCertPolicy<'a> {
    pub ca: &'a Path,
    pub required: bool,
}

/// A listener's TLS config: TLS 1.2+ (or 1.3 only), ALPN `h2` (when enabled) and `http/1.1`,
/// and optionally client certificates.
pub fn server_config(
    resolver: Arc<SniResolver>,
    tls13_only: bool,
    http2: bool,
    client_certs: Option<ClientCertPolicy<'_>>,
) -> Result<ServerConfig, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match client_certs {
        None => builder.with_no_client_auth(),
        Some(policy) => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(load_certs(policy.ca)?);
            if added == 0 {
                return Err(TlsError::NoCa {
                    path: policy.ca.to_owned(),
                });
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            );
            let verifier = if policy.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?,
            )
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// A listener's TLS config for QUIC (HTTP/3): the same certificates, SNI selection and client
/// certificate policy as `listener`, with ALPN `h3` only. QUIC always runs TLS 1.3 (the TLS 1.2
/// entry of `listener` is never used). Early data (0-RTT) stays off: a replayed 0-RTT request
/// would pass the policy chain twice, and non-idempotent requests could be repeated by an
/// attacker who captured them.
pub fn http3_server_config(listener: &ServerConfig) -> ServerConfig {
    let mut config = listener.clone();
    config.alpn_protocols = vec![b"h3".to_vec()];
    config.max_early_data_size = 0;
    config
}

/// An upstream TLS config: verifies the server against `ca` (or the web roots), optionally
/// presenting a client certificate.
pub fn client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let (added, _) = roots.add_parsable_certificates(load_certs(path)?);
            if added == 0 {
                return Err(TlsError::NoCa {
                    path: path.to_owned(),
                });
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}
