//! Pooled HTTP clients towards upstreams, one per worker thread so that a connection is only ever
//! driven by the runtime that uses it (no cross-thread wake-ups, no shared pool lock).

use std::{
    cell::Cell,
    hash::{Hash, Hasher},
    sync::{Arc, OnceLock},
    time::Duration,
};

use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::pipeline::UpstreamBody;

/// The client type used for every upstream.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// How targets are spoken to, from the target URL's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetScheme {
    /// `http://`: HTTP/1.1 with keep-alive.
    Http1,
    /// `h2c://`: HTTP/2 over plaintext with prior knowledge.
    H2c,
    /// `https://`: TLS, HTTP/2 or HTTP/1.1 by ALPN.
    Https,
}

impl TargetScheme {
    pub fn from_config(scheme: &str) -> Self {
        match scheme {
            "h2c" => Self::H2c,
            "https" => Self::Https,
            _ => Self::Http1,
        }
    }

    pub fn uri_scheme(self) -> http::uri::Scheme {
        match self {
            Self::Https => http::uri::Scheme::HTTPS,
            Self::Http1 | Self::H2c => http::uri::Scheme::HTTP,
        }
    }
}

/// Everything that shapes a client; equal settings share pools across reloads.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub scheme: TargetScheme,
    pub tls: Arc<rustls::ClientConfig>,
    /// Identifies the TLS settings (files and names) for equality; the config itself is not comparable.
    pub tls_fingerprint: String,
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl PartialEq for ClientSettings {
    fn eq(&self, other: &Self) -> bool {
        self.scheme == other.scheme
            && self.tls_fingerprint == other.tls_fingerprint
            && self.server_name == other.server_name
            && self.connect_timeout == other.connect_timeout
            && self.max_idle == other.max_idle
            && self.idle_timeout == other.idle_timeout
    }
}

impl Eq for ClientSettings {}

impl Hash for ClientSettings {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.scheme.hash(state);
        self.tls_fingerprint.hash(state);
        self.server_name.hash(state);
        self.connect_timeout.hash(state);
        self.max_idle.hash(state);
        self.idle_timeout.hash(state);
    }
}

impl ClientSettings {
    fn build(&self) -> HttpClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http();
        let builder = match &self.server_name {
            Some(name) => match rustls_pki_types::ServerName::try_from(name.clone()) {
                Ok(server_name) => builder.with_server_name_resolver(
                    hyper_rustls::FixedServerNameResolver::new(server_name),
                ),
                Err(_) => builder,
            },
            None => builder,
        };
        let connector = builder.enable_all_versions().wrap_connector(http);
        let mut client = Client::builder(TokioExecutor::new());
        client
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(self.max_idle)
            .pool_idle_timeout(self.idle_timeout);
        if self.scheme == TargetScheme::H2c {
            client.http2_only(true);
        }
        client.build(connector)
    }
}

thread_local! {
    static WORKER_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Called once by each worker thread with its index, so it uses its own pools.
pub fn set_worker_slot(index: usize) {
    WORKER_SLOT.with(|slot| slot.set(Some(index)));
}

/// One lazily built client per worker thread (plus a shared one for other threads).
#[derive(Debug)]
pub struct WorkerClients {
    settings: ClientSettings,
    slots: Box<[OnceLock<HttpClient>]>,
}

impl WorkerClients {
    pub fn new(settings: ClientSettings, slots: usize) -> Self {
        Self {
            settings,
            slots: (0..slots.max(1)).map(|_| OnceLock::new()).collect(),
        }
    }

    /// This thread's client.
    pub fn get(&self) -> &HttpClient {
        let last = self.slots.len() - 1;
        let index = WORKER_SLOT.with(Cell::get).map_or(last, |i| i.min(last));
        self.slots[index].get_or_init(|| self.settings.build())
    }
}
