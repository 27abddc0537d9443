//! The shared Redis server: one multiplexed, self-reconnecting connection per config generation,
//! opened on first use (so a gateway starts, and serves routes that do not need Redis, while Redis
//! is down), every command bounded by the configured timeout.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use crate::config::model::RedisConfig;

/// Why a shared-state operation failed. Callers fail closed on any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis failed recently; not asked again yet")]
    Unavailable,
}

/// A Redis server shared by the replicas, with this gateway's key prefix.
pub struct RedisStore {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the URL may hold a password
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore {
    /// Checks the URL; connects later, on first use.
    pub fn from_config(config: &RedisConfig) -> Result<Self, String> {
        let client = redis::Client::open(config.url.as_str()).map_err(|_| {
            // the error text could echo the URL, and with it a password
            "not a usable Redis URL (`redis://[:PASSWORD@]HOST[:PORT][/DB]`)".to_owned()
        })?;
        Ok(Self {
            client,
            connection: OnceCell::new(),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout.0,
        })
    }

    /// Sets `key` (under the prefix) for `ttl` unless it exists; true when this call set it.
    /// One atomic `SET NX PX`, so two replicas racing for the same key cannot both win.
    pub async fn set_if_absent(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(key))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        let reply: Option<String> = self.query(&command).await?;
        Ok(reply.is_some())
    }

    /// How long one command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `name` under this gateway's key prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs one command (whose keys the caller made with [`Self::key`]), within the timeout.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.bounded(async {
            let mut connection = self.connection().await?;
            command.query_async(&mut connection).await
        })
        .await
    }

    /// Runs a Lua script (`EVALSHA`, loading it when the server does not know it yet) with
    /// `keys` (made with [`Self::key`]) and `args`, within the timeout.
    pub async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[u64],
    ) -> Result<T, StoreError> {
        self.bounded(async {
            let mut connection = self.connection().await?;
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(*arg);
            }
            invocation.invoke_async(&mut connection).await
        })
        .await
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        self.connection
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
    }

    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}
